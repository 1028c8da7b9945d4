"""Aria processor: images -> padded canvases on the model's device, `<|img|>` expansion.

Matches transformers 5 `AriaImageProcessor` (torchvision backend) and `AriaProcessor`:

```
uint8 [3, H, W]
  split_image: best of split_resolutions (select_best_resolution), resized into it keeping the
               aspect ratio (get_patch_output_size), centred on a zero canvas of that size,
               cut into M x M crops row-major (divide_to_patches); else the image is one crop
  each crop:   longest side -> M, the other int(side * M / longest), at least min_image_size;
               BICUBIC (antialiased, on uint8); zero-padded right / bottom to M x M
  (x - 0.5 * 255) / (0.5 * 255)  -> pixel_values [num_crops, 3, M, M] float32
```

M = max_image_size (490 or 980). The valid (unpadded) part of each crop is `data["valid_size"]`
([num_crops, 2] int64, height and width in pixels: HF's `pixel_mask`). An image's placeholder
(`<|img|>`, between `<fim_prefix>` and `<fim_suffix>` in Aria's prompts) becomes
`num_crops * size_conversion[M]` `<|img|>` tokens, all filled with image embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vlmx.models.processing import Expansion, ImageProcessorBase
from vlmx.models.processor_settings import (
    BICUBIC,
    check_processor_flags,
    positive_int,
    reject_unknown_kwargs,
    require_token_id,
)

SUPPORTED_KWARGS = ("max_image_size", "min_image_size", "split_image")
MAX_IMAGE_SIZES = (490, 980)
_DEFAULT_GRIDS = [(1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 4), (2, 3), (2, 2)]
_DEFAULT_GRIDS += [(2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1)]
DEFAULT_SPLIT_RESOLUTIONS = tuple((r * 490, c * 490) for r, c in _DEFAULT_GRIDS)
DEFAULT_SIZE_CONVERSION = {490: 128, 980: 256}


@dataclass(frozen=True, slots=True)
class AriaImageSettings:
    """Image-processor settings; the defaults are AriaImageProcessor's (and AriaProcessor's
    `max_image_size=980, split_image=False`)."""

    max_image_size: int = 980
    min_image_size: int = 336
    split_image: bool = False
    split_resolutions: tuple[tuple[int, int], ...] = DEFAULT_SPLIT_RESOLUTIONS
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255


def apply_kwargs(settings: AriaImageSettings, kwargs: dict) -> AriaImageSettings:
    """`settings` updated by `mm_processor_kwargs`, checked."""
    reject_unknown_kwargs(
        kwargs, SUPPORTED_KWARGS, "Aria", "max_image_size=490|980, min_image_size=int, "
        "split_image=bool"
    )  # fmt: skip
    changes: dict = {}
    if "max_image_size" in kwargs:
        if kwargs["max_image_size"] not in MAX_IMAGE_SIZES:
            raise ValueError(
                f"mm_processor_kwargs max_image_size={kwargs['max_image_size']!r} must be 490 "
                "or 980 (Aria's projector has queries for those two sizes)"
            )
        changes["max_image_size"] = kwargs["max_image_size"]
    if "min_image_size" in kwargs:
        changes["min_image_size"] = positive_int(kwargs["min_image_size"], "min_image_size")
    if "split_image" in kwargs:
        if not isinstance(kwargs["split_image"], bool):
            raise ValueError(
                f"mm_processor_kwargs split_image={kwargs['split_image']!r} must be bool"
            )
        changes["split_image"] = kwargs["split_image"]
    return replace(settings, **changes) if changes else settings


def resolve_image_settings(raw: dict) -> AriaImageSettings:
    """Class defaults < the checkpoint's image-processor config."""
    check_processor_flags(raw, ("do_rescale", "do_normalize"), resample=(BICUBIC,))
    default = AriaImageSettings()
    resolutions = raw.get("split_resolutions") or default.split_resolutions
    settings = AriaImageSettings(
        split_resolutions=tuple((int(h), int(w)) for h, w in resolutions),
        image_mean=tuple(raw.get("image_mean") or default.image_mean),
        image_std=tuple(raw.get("image_std") or default.image_std),
        rescale_factor=raw.get("rescale_factor") or default.rescale_factor,
    )
    file_kwargs = {k: raw[k] for k in SUPPORTED_KWARGS if raw.get(k) is not None}
    return apply_kwargs(settings, file_kwargs)


def best_resolution(height: int, width: int, resolutions) -> tuple[int, int]:
    """HF `select_best_resolution`: the most effective pixels, then the least waste."""
    best, best_effective, best_waste = None, 0, float("inf")
    for h, w in resolutions:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    assert best is not None
    return best


def fit_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """HF `get_patch_output_size`: the image scaled to fit `target`, aspect kept."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def crop_size(height: int, width: int, s: AriaImageSettings) -> tuple[int, int]:
    """The size one crop is resized to before padding to M x M."""
    m = s.max_image_size
    scale = m / max(height, width)
    if width >= height:
        return max(int(height * scale), s.min_image_size), m
    return m, max(int(width * scale), s.min_image_size)


def num_crops(height: int, width: int, s: AriaImageSettings) -> int:
    if not s.split_image:
        return 1
    h, w = best_resolution(height, width, s.split_resolutions)
    return math.ceil(h / s.max_image_size) * math.ceil(w / s.max_image_size)


class AriaProcessor(ImageProcessorBase[tuple[torch.Tensor, torch.Tensor]]):
    """The processor of Aria (see `vlmx.models.interface`). A prompt holds one `<|img|>` per
    image (the form vLLM's example writes), or its expansion already (HF's processor's ids)."""

    shrink_images_hint = "mm_processor_kwargs={'max_image_size': 490}"
    image_processor_name = "AriaImageProcessor"
    placeholder_token = "<|img|>"
    placeholder_example = "<fim_prefix><|img|><fim_suffix>"

    def configure(self, raw: dict, processor: dict) -> None:
        self.settings = apply_kwargs(resolve_image_settings(raw), self.engine_kwargs)
        conversion = processor.get("size_conversion") or DEFAULT_SIZE_CONVERSION
        self.size_conversion = {int(k): int(v) for k, v in conversion.items()}
        vision = self.hf_config.vision_config
        self.patch_size: int = vision.patch_size
        patch_to_query = {
            int(k): int(v) for k, v in self.hf_config.projector_patch_to_query_dict.items()
        }
        for size in MAX_IMAGE_SIZES:
            patches = (size // self.patch_size) ** 2
            if (
                size in self.size_conversion
                and patch_to_query.get(patches) != self.size_conversion[size]
            ):
                raise ValueError(
                    f"processor size_conversion[{size}]={self.size_conversion[size]} does not "
                    f"match the model's projector_patch_to_query_dict ({patches} patches -> "
                    f"{patch_to_query.get(patches)} queries)"
                )
        self.image_token_id = require_token_id(self.tokenizer, self.placeholder_token, "Aria")
        s = self.settings
        self.use_normalization(s.image_mean, s.image_std, s.rescale_factor)

    def prompt_settings(self, mm_processor_kwargs: dict) -> AriaImageSettings:
        s = apply_kwargs(self.settings, mm_processor_kwargs)
        if s.min_image_size > s.max_image_size:
            raise ValueError(
                f"min_image_size={s.min_image_size} exceeds max_image_size={s.max_image_size}"
            )
        if s.max_image_size not in self.size_conversion:
            raise ValueError(
                f"max_image_size={s.max_image_size} has no entry in the processor's "
                f"size_conversion {sorted(self.size_conversion)}"
            )
        return s

    def tokens_per_crop(self, s: AriaImageSettings) -> int:
        return self.size_conversion[s.max_image_size]

    def _crops(self, image: torch.Tensor, s: AriaImageSettings) -> list[torch.Tensor]:
        """uint8 [3, H, W] on the device -> its crops before the per-crop resize."""
        if not s.split_image:
            return [image]
        height, width = image.shape[-2:]
        target = best_resolution(height, width, s.split_resolutions)
        new_h, new_w = fit_size(height, width, target)
        resized = self.resize(image[None], new_h, new_w, "bicubic")[0]
        top, r_y = divmod(target[0] - new_h, 2)
        left, r_x = divmod(target[1] - new_w, 2)
        canvas = F.pad(resized, (left, left + r_x, top, top + r_y))  # [3, th, tw]
        m = s.max_image_size
        return [
            canvas[:, i : i + m, j : j + m]
            for i in range(0, target[0], m)
            for j in range(0, target[1], m)
        ]

    def preprocess(
        self, images: list[torch.Tensor], s: AriaImageSettings
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (pixel_values [num_crops, 3, M, M] float32, valid_size [num_crops, 2])."""
        m = s.max_image_size
        outputs = []
        for image in images:
            if min(image.shape[-2:]) <= 0:
                raise ValueError(f"image of {list(image.shape[-2:])} pixels is empty")
            image = image.to(self.device, non_blocking=True)
            canvases, sizes = [], []
            for crop in self._crops(image, s):
                new_h, new_w = crop_size(*crop.shape[-2:], s)
                resized = self.resize(crop[None].contiguous(), new_h, new_w, "bicubic")[0]
                canvases.append(F.pad(resized, (0, m - new_w, 0, m - new_h)))  # [3, M, M]
                sizes.append((new_h, new_w))
            pixels = self.normalize(torch.stack(canvases))  # [num_crops, 3, M, M] float32
            outputs.append((pixels, torch.tensor(sizes, dtype=torch.int64)))
        return outputs

    def expand(
        self, image: torch.Tensor, output: tuple[torch.Tensor, torch.Tensor], s: AriaImageSettings
    ) -> Expansion:
        pixels, valid_size = output
        num_tokens = pixels.shape[0] * self.tokens_per_crop(s)
        data = {"pixel_values": pixels, "valid_size": valid_size}
        return Expansion([self.image_token_id] * num_tokens, 0, num_tokens, data)
