"""The shared processor pipeline, with the hooks a family fills in, and what the family
processors share around it: normalization, the cache of their outputs, batching on the device,
input checks and placeholder runs (their settings are read and checked in
`models/processor_settings.py`).

Each family's processor (`vlmx.models.interface.Processor`) turns uint8 [3, H, W] CPU images into
encoder inputs on the model's device, and each image placeholder of a prompt into the tokens the
image's embeddings take. `ImageProcessorBase.process` runs the steps every family shares:

```
check images, no video placeholders
settings   = prompt_settings(mm_processor_kwargs)          hook: engine-wide + this prompt's
check_placeholders(ids, len(images))                        hook (default: runs of the token)
outputs    = preprocess(images the cache lacks, settings)   hook; cached by mm_hash
expansions = expand(image, output, settings)                hook: the tokens that replace one
                                                            placeholder, where its embeds go
spans      = placeholder_spans(ids, expansions)             hook (default: a run of one token,
                                                            or the expansion already in place)
write: text, expansion, text, ...  -> PlaceholderRange per image
prompt_extras(token_ids, features)                          hook: e.g. M-RoPE positions
```

Images are keyed by `mm_hash` (content + settings), so a repeated image is computed once and then
served from a `TensorCache` until it is evicted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from vlmx.config import ModelConfig
from vlmx.models.processor_settings import read_processor_files
from vlmx.multimodal.cache import Entry, TensorCache
from vlmx.multimodal.hashing import hash_image, hash_with_settings
from vlmx.multimodal.inputs import MMFeature, PlaceholderRange, ProcessedPrompt
from vlmx.multimodal.resize import Filter, ResizeTaps, resize_uint8

DEFAULT_CACHE_BYTES = 512 * 1024**2

Output = TypeVar("Output")


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


@dataclass(frozen=True, slots=True)
class Expansion:
    """What one image's placeholder becomes in the prompt."""

    token_ids: list[int]  # the tokens that replace the placeholder
    offset: int  # index in `token_ids` of the first token the image's embeddings fill
    length: int  # number of those tokens (== the encoder's embeddings for the image)
    data: dict[str, torch.Tensor]  # the encoder inputs, MMFeature.data


class ImageProcessorBase(Generic[Entry]):
    """The shared pipeline of every family's processor (the module docstring draws it): its
    device and dtype, the engine's tokenizer, a `TensorCache` of preprocessed images keyed by
    content and the settings that shaped them, and the resize taps it reuses.

    A family sets the class attributes, reads its settings in `configure` and fills in the
    hooks `prompt_settings`, `preprocess` and `expand` (and, where its prompts differ from one
    run of `image_token_id` per image, `count_placeholders` / `check_placeholders` /
    `placeholder_spans`).
    """

    # How a user makes this family's images cost fewer tokens (quoted in error messages).
    shrink_images_hint: str
    # The image-processor class whose defaults apply when a checkpoint has no config for it
    # (named in a warning); None: no warning.
    image_processor_name: str | None = None
    placeholder_token: str  # the image placeholder, as a user writes it
    placeholder_example: str | None = None  # what to write per image, if more than the token
    placeholder_hint: str = "llm.chat writes them for you"
    video_token: str | None = None  # the video placeholder's name; its id in `video_token_id`
    image_token_id: int
    video_token_id: int | None = None
    # [C, 1, 1] on the device, from `use_normalization`
    _mean: torch.Tensor
    _std: torch.Tensor

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer,
        device: torch.device | str,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = model_config.dtype
        self.tokenizer = tokenizer
        self.hf_config = model_config.hf_config
        self.engine_kwargs: dict = model_config.mm_processor_kwargs or {}  # engine-wide
        self.cache: TensorCache[Entry] = TensorCache(cache_bytes)
        self.resize_taps = ResizeTaps()
        image_config, processor_config = read_processor_files(
            model_config.model_path, self.image_processor_name
        )
        self.configure(image_config, processor_config)

    # -- hooks ----------------------------------------------------------------------------

    def configure(self, image_config: dict, processor_config: dict) -> None:
        """Read the family's settings from the checkpoint's image-processor config and
        processor config (and `engine_kwargs`), check them against the model's `hf_config`,
        set the token ids and call `use_normalization`."""
        raise NotImplementedError

    def prompt_settings(self, mm_processor_kwargs: dict) -> Any:
        """The settings of one prompt: the engine-wide ones updated by its kwargs, checked. A
        dict or a dataclass; it is part of each image's mm_hash."""
        raise NotImplementedError

    def preprocess(self, images: list[torch.Tensor], settings: Any) -> list[Entry]:
        """uint8 [3, H, W] CPU images -> their encoder inputs on the device, one entry each,
        no cache."""
        raise NotImplementedError

    def expand(self, image: torch.Tensor, output: Entry, settings: Any) -> Expansion:
        """What the placeholder of `image` (preprocessed into `output`) becomes."""
        raise NotImplementedError

    def count_placeholders(self, prompt_token_ids: list[int]) -> int:
        """The images the prompt refers to: one per run of `image_token_id`."""
        return len(find_token_runs(prompt_token_ids, self.image_token_id))

    def check_placeholders(self, prompt_token_ids: list[int], num_images: int) -> None:
        """Before any preprocessing: one placeholder per image, or a ValueError."""
        check_placeholder_count(
            self.count_placeholders(prompt_token_ids),
            num_images,
            self.placeholder_token,
            self.placeholder_example,
            self.placeholder_hint,
        )

    def placeholder_spans(
        self, prompt_token_ids: list[int], expansions: list[Expansion]
    ) -> list[tuple[int, int]]:
        """(start, end) in the prompt of each image's placeholder, replaced by its expansion:
        a single `image_token_id`, or the expansion already in place (the ids HF's processor
        returns) around a run of exactly its embedding tokens."""
        spans = []
        runs = find_token_runs(prompt_token_ids, self.image_token_id)
        for image_idx, ((start, end), e) in enumerate(zip(runs, expansions, strict=True)):
            begin = start - e.offset
            if (
                end - start == e.length
                and begin >= 0
                and (prompt_token_ids[begin : begin + len(e.token_ids)] == e.token_ids)
            ):
                spans.append((begin, begin + len(e.token_ids)))
            elif end - start == 1:
                spans.append((start, end))
            else:
                around = "" if len(e.token_ids) == e.length else " in its expanded layout"
                raise ValueError(
                    f"image {image_idx} needs 1 placeholder token ({self.placeholder_token}) or "
                    f"exactly {e.length}{around}, but the prompt has a run of {end - start}"
                )
        return spans

    def prompt_extras(self, token_ids: list[int], features: list[MMFeature]) -> dict:
        """More fields of the `ProcessedPrompt` (e.g. M-RoPE positions); none by default."""
        return {}

    # -- the pipeline ---------------------------------------------------------------------

    def process(
        self,
        prompt_token_ids: list[int],
        images: list[torch.Tensor],
        mm_processor_kwargs: dict,
    ) -> ProcessedPrompt:
        check_image_tensors(images)
        check_no_video_placeholders(prompt_token_ids, self.video_token_id, self.video_token)
        settings = self.prompt_settings(mm_processor_kwargs or {})
        self.check_placeholders(prompt_token_ids, len(images))
        mm_hashes, outputs = self.cached_preprocess(
            images, settings_dict(settings), lambda todo: self.preprocess(todo, settings)
        )
        expansions = [
            self.expand(image, output, settings) for image, output in zip(images, outputs)
        ]
        spans = self.placeholder_spans(prompt_token_ids, expansions)

        token_ids: list[int] = []
        features: list[MMFeature] = []
        cursor = 0  # next unread index of prompt_token_ids
        for (start, end), e, mm_hash in zip(spans, expansions, mm_hashes, strict=True):
            token_ids += prompt_token_ids[cursor:start]
            placeholder = PlaceholderRange(offset=len(token_ids) + e.offset, length=e.length)
            token_ids += e.token_ids
            features.append(MMFeature(mm_hash=mm_hash, placeholder=placeholder, data=e.data))
            cursor = end
        token_ids += prompt_token_ids[cursor:]
        return ProcessedPrompt(
            prompt_token_ids=token_ids,
            mm_features=features,
            **self.prompt_extras(token_ids, features),
        )

    # -- shared steps ---------------------------------------------------------------------

    def use_normalization(
        self,
        image_mean: list[float] | tuple[float, ...],
        image_std: list[float] | tuple[float, ...],
        rescale_factor: float,
    ) -> None:
        """Set the constants of `normalize` (see `normalization_constants`)."""
        self._mean, self._std = normalization_constants(
            image_mean, image_std, rescale_factor, self.device
        )

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] -> float32, rescaled and normalized in one step."""
        return (pixels.to(torch.float32) - self._mean).div_(self._std)

    def resize(self, images: torch.Tensor, height: int, width: int, filter: Filter) -> torch.Tensor:
        """`resize_uint8` with this processor's cache of resize taps."""
        return resize_uint8(images, height, width, filter, self.resize_taps)

    def preprocess_resized(
        self,
        images: list[torch.Tensor],
        target: Callable[[int, int], tuple[int, int]],
        filter: Filter,
        finish: Callable[[torch.Tensor], Sequence[Entry]],
    ) -> list[Entry]:
        """Each image resized to `target(height, width)` and normalized; the images that share
        (size, target) as one float32 [B, 3, h, w] batch, whose entries `finish` returns."""

        def key(image: torch.Tensor) -> tuple[int, ...]:
            height, width = image.shape[-2:]
            return (height, width, *target(height, width))

        def run(group: tuple[int, ...], batch: torch.Tensor) -> Sequence[Entry]:
            batch = self.resize(batch, group[2], group[3], filter)  # [B, 3, h, w] uint8
            return finish(self.normalize(batch))

        return preprocess_in_groups(images, key, self.device, run)

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


def settings_dict(settings: Any) -> dict:
    """A prompt's settings as the dict its images' mm_hashes are keyed by."""
    if dataclasses.is_dataclass(settings):
        return dataclasses.asdict(settings)
    return settings


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
    prompt_token_ids: list[int], video_token_id: int | None, token_name: str | None
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
