"""What the family processors share: config files, normalization, the cache of their outputs,
input checks and placeholder runs.

Each family's processor (see `vlmx.models.interface`) turns uint8 [3, H, W] CPU images into
encoder inputs on the model's device. Images are keyed by `mm_hash` (content + settings), so a
repeated image is computed once and then served from a `TensorCache` until it is evicted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

import torch

from vlmx.config import ModelConfig
from vlmx.multimodal.cache import Entry, TensorCache
from vlmx.multimodal.hashing import hash_image, hash_with_settings

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 512 * 1024**2

Output = TypeVar("Output")


def read_processor_files(model_path: str, defaults_name: str | None = None) -> tuple[dict, dict]:
    """(image-processor dict, processor dict) of a checkpoint, found as transformers finds them.

    transformers 5 `save_pretrained` nests the image processor under "image_processor" in
    processor_config.json, which wins; hub checkpoints keep it in preprocessor_config.json (and
    may keep processor settings such as `image_seq_len` in processor_config.json). With neither,
    the image-processor dict is empty and, when `defaults_name` is given, a warning says that
    class's defaults apply.
    """
    processor: dict = {}
    nested = os.path.join(model_path, "processor_config.json")
    if os.path.isfile(nested):
        with open(nested) as f:
            processor = json.load(f)
        if "image_processor" in processor:
            return processor["image_processor"], processor
    legacy = os.path.join(model_path, "preprocessor_config.json")
    if os.path.isfile(legacy):
        with open(legacy) as f:
            return json.load(f), processor
    if defaults_name is not None:
        logger.warning(
            "%s has no processor_config.json or preprocessor_config.json; using %s's defaults",
            model_path,
            defaults_name,
        )
    return {}, processor


def check_processor_flags(
    raw: dict, keys: tuple[str, ...] = ("do_resize", "do_rescale", "do_normalize")
) -> None:
    """Raise if the image-processor config turns off a step that vlmx always runs."""
    for key in keys:
        if raw.get(key) is False:
            raise ValueError(f"image processor config sets {key}=false; vlmx supports only true")


def reject_unknown_kwargs(
    kwargs: dict, supported: Iterable[str], family: str, supported_text: str | None = None
) -> None:
    """Raise if `mm_processor_kwargs` names a key this family does not take; the message lists
    `supported_text`, else the supported names."""
    supported = tuple(supported)
    unknown = sorted(set(kwargs) - set(supported))
    if unknown:
        raise ValueError(
            f"unknown mm_processor_kwargs {unknown} for {family}; supported: "
            f"{supported_text or ', '.join(supported)}"
        )


def normalization_constants(
    image_mean: list[float] | tuple[float, ...],
    image_std: list[float] | tuple[float, ...],
    rescale_factor: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as [C, 1, 1] tensors on `device`, scaled by 1 / rescale_factor, so that
    `(uint8 pixels - mean) / std` rescales and normalizes in one step.

    NOTE: same ops as HF's `_fuse_mean_std_and_rescale_factor`, so the float32 constants agree.
    """
    scale = 1.0 / rescale_factor
    mean = (torch.tensor(image_mean) * scale).view(-1, 1, 1).to(device)  # [C, 1, 1]
    std = (torch.tensor(image_std) * scale).view(-1, 1, 1).to(device)  # [C, 1, 1]
    return mean, std


class ImageProcessorBase(Generic[Entry]):
    """What every family's processor shares: its device and dtype, and a `TensorCache` of
    preprocessed images keyed by content and the settings that shaped them."""

    # How a user makes this family's images cost fewer tokens (quoted in error messages).
    shrink_images_hint: str
    # [C, 1, 1] on the device, from `normalization_constants` (set by each family's constructor)
    _mean: torch.Tensor
    _std: torch.Tensor

    def __init__(
        self,
        model_config: ModelConfig,
        device: torch.device | str,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = model_config.dtype
        self.cache: TensorCache[Entry] = TensorCache(cache_bytes)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] -> float32, rescaled and normalized in one step."""
        return (pixels.to(torch.float32) - self._mean).div_(self._std)

    def cached_preprocess(
        self,
        images: list[torch.Tensor],
        settings: dict,
        preprocess: Callable[[list[torch.Tensor]], list[Entry]],
    ) -> tuple[list[str], list[Entry]]:
        """(mm_hashes, outputs): each image's hash with `settings`, and its preprocessed output,
        from the cache or from one `preprocess` call over the images the cache lacks."""
        mm_hashes = [hash_with_settings(hash_image(image), settings) for image in images]
        return mm_hashes, self.cache.get_or_compute(mm_hashes, images, preprocess)


def preprocess_in_groups(
    images: list[torch.Tensor],
    key: Callable[[torch.Tensor], tuple],
    device: torch.device,
    fn: Callable[[tuple, torch.Tensor], Sequence[Output]],
) -> list[Output]:
    """One output per image, computed a group at a time: the images that share `key(image)`
    (their size and what it becomes) are stacked on `device` as one uint8 [B, 3, H, W] batch,
    and `fn(key, batch)` returns the outputs of the batch's images in order."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(key(image), []).append(i)
    out: list[Output] = [None] * len(images)  # type: ignore[list-item]
    for group_key, idxs in groups.items():
        batch = _stack_on_device([images[i] for i in idxs], device)  # [B, 3, H, W] uint8
        for i, output in zip(idxs, fn(group_key, batch), strict=True):
            out[i] = output
    return out


def _stack_on_device(images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Same-size images [3, H, W] -> one [B, 3, H, W] batch on `device`.

    NOTE: from the CPU to CUDA through pinned memory, without blocking. A copy from pageable
    memory waits for all work queued on the stream, the engine's current step included, which
    would hold each thread that processes prompts to about one image per engine step.
    """
    if torch.device(device).type != "cuda" or any(im.device.type != "cpu" for im in images):
        return torch.stack([image.to(device) for image in images])
    pinned = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=True)
    torch.stack(images, out=pinned)
    # NOTE: the copy holds the pinned block (torch's host allocator reuses it once it is done).
    return pinned.to(device, non_blocking=True)


def check_image_tensors(images: list[torch.Tensor]) -> None:
    """Raise unless every image is a uint8 [3, H, W] tensor (what `load_image` returns)."""
    for image in images:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"images must be uint8 [3, H, W] tensors, got {image.dtype} {list(image.shape)}"
            )


def check_no_video_placeholders(
    prompt_token_ids: list[int], video_token_id: int | None, token_name: str
) -> None:
    """Raise if the prompt holds the video placeholder `token_name` (id `video_token_id`)."""
    if video_token_id is not None and video_token_id in prompt_token_ids:
        raise ValueError(f"prompt holds video placeholders ({token_name}); vlmx takes images only")


def check_placeholder_count(
    num_found: int,
    num_images: int,
    placeholder: str,
    example: str | None = None,
    hint: str = "llm.chat writes them for you",
) -> None:
    """One placeholder per image, or a ValueError saying what to put in the prompt."""
    if num_found != num_images:
        raise ValueError(
            f"prompt has {num_found} image placeholders ({placeholder}) but {num_images} images "
            f"were given; put one {example or placeholder} in the prompt per image ({hint})"
        )


def find_token_runs(prompt_token_ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive `token_id` tokens in the prompt.

    ```
    ids:    t P P t t P t      P = token_id
    runs:     [1, 3)   [5, 6)
    ```
    """
    is_token = torch.tensor(prompt_token_ids, dtype=torch.int64) == token_id  # [L]
    edges = torch.nn.functional.pad(is_token.to(torch.int8), (1, 1)).diff()  # [L + 1]
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends, strict=True))
