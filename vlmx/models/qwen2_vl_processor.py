"""Qwen2-VL / Qwen2.5-VL processor: images -> patches on the model's device, placeholders, M-RoPE.

Matches transformers 5.24 `Qwen2VLImageProcessor` (the default, torchvision backend), which both
families share, op for op:

```
uint8 [3, H, W] --tvF.resize(bicubic, antialias, on uint8)--> uint8 [3, h, w]  (h, w: smart_resize)
  --.float(), (x - mean * 255) / (std * 255)--> float32 [3, h, w]  (rescale fused in normalize)
  --patchify--> [grid_h * grid_w, 3 * temporal_patch * patch * patch]  (grid_h = h / patch)
```

and `Qwen2VLModel.get_rope_index` / `Qwen2_5_VLModel.get_rope_index` for the positions of a prompt
with still images (Qwen2.5-VL's time interval applies to videos only).

HF runs it on the CPU by default, where torchvision resizes uint8 with a fixed-point kernel (PIL's
algorithm, int16 weights); on CUDA torchvision resizes in float32 and rounds, which differs by up
to ~17 levels at sharp edges. `vlmx.multimodal.resize.resize_uint8` gives the CPU kernel's bits
on any device, so the output equals HF's default whatever the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlmx.models.processing import (
    Expansion,
    ImageProcessorBase,
)
from vlmx.models.processor_settings import (
    BICUBIC,
    check_processor_flags,
    first_set,
    positive_int,
    reject_unknown_kwargs,
)
from vlmx.multimodal.inputs import MMFeature

SUPPORTED_KWARGS = ("min_pixels", "max_pixels")
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """Image-processor settings; the defaults are Qwen2VLImageProcessor's class defaults."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The size Qwen2-VL resizes a `height` x `width` image to (HF's `smart_resize` rules).

    Both sides become multiples of `factor` (= patch_size * merge_size), the area is brought into
    [min_pixels, max_pixels] by a common scale, and the aspect ratio is kept as rounding allows.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {height}x{width} pixels has aspect ratio "
            f"{max(height, width) / min(height, width):.1f}; Qwen2-VL accepts at most "
            f"{MAX_ASPECT_RATIO}. Crop or pad the image first."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resolve_image_settings(raw: dict, mm_processor_kwargs: dict) -> ImageSettings:
    """Defaults < checkpoint file < engine-wide `mm_processor_kwargs`.

    In the file, top-level min_pixels / max_pixels win over `size` (as in HF's `__init__`).
    """
    check_processor_flags(raw, resample=(BICUBIC,))
    size = raw.get("size") or {}
    min_pixels = first_set(raw.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"))
    max_pixels = first_set(raw.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"))
    default = ImageSettings()
    kwargs = check_kwargs(
        {
            "min_pixels": first_set(min_pixels, default.min_pixels),
            "max_pixels": first_set(max_pixels, default.max_pixels),
        },
        mm_processor_kwargs,
    )
    for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
        kwargs[key] = first_set(raw.get(key), getattr(default, key))
    for key in ("image_mean", "image_std"):
        kwargs[key] = tuple(first_set(raw.get(key), getattr(default, key)))
    return ImageSettings(**kwargs)


def check_kwargs(base: dict, overrides: dict) -> dict:
    """`base` (min_pixels, max_pixels) updated by `overrides`, validated."""
    reject_unknown_kwargs(overrides, SUPPORTED_KWARGS, "Qwen2-VL")
    merged = {**base, **overrides}
    for key, value in merged.items():
        positive_int(value, key)
    if merged["min_pixels"] > merged["max_pixels"]:
        raise ValueError(
            f"mm_processor_kwargs min_pixels={merged['min_pixels']} is larger than "
            f"max_pixels={merged['max_pixels']}"
        )
    return merged


def patchify(images: torch.Tensor, patch: int, merge: int, temporal_patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, grid_h * grid_w, C * temporal_patch * patch * patch].

    Patches come in merge-window order (the vision encoder merges each merge x merge window of
    neighbours into one token), and within a patch the values in (C, T, py, px) order, the still
    frame repeated along T:

    ```
    grid 4x4, merge 2:   0  1 | 4  5      patch index of each grid cell
                         2  3 | 6  7
                        ------+------
                         8  9 | 12 13
                        10 11 | 14 15
    ```
    """
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, gh/m, gw/m, m, m, C, p, p]
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch, -1, -1)  # [.., C, T, p, p]
    return x.reshape(b, gh * gw, c * temporal_patch * patch * patch)


class Qwen2VLProcessor(ImageProcessorBase[tuple[torch.Tensor, torch.Tensor]]):
    """The processor of Qwen2-VL and Qwen2.5-VL (see `vlmx.models.interface`).

    ```
    prompt ids:  t t <vs> <|image_pad|> <ve> t       one pad per image (or already expanded)
    expanded:    t t <vs> P P P P P P   <ve> t       grid_t * grid_h * grid_w / merge**2 pads
    positions:   0 1  2   3 3 3 4 4 4    6   7       row axis shown: image of 2x3 merged tokens
    ```
    """

    shrink_images_hint = "mm_processor_kwargs={'max_pixels': ...}"
    image_processor_name = "Qwen2VLImageProcessor"
    placeholder_token = "<|image_pad|>"
    placeholder_example = "<|vision_start|><|image_pad|><|vision_end|>"
    video_token = "<|video_pad|>"

    def configure(self, image_config: dict, _: dict) -> None:
        s = self.settings = resolve_image_settings(image_config, self.engine_kwargs)
        hf_config = self.hf_config
        vision = hf_config.vision_config
        ours = (s.patch_size, s.temporal_patch_size, s.merge_size)
        theirs = (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
        if ours != theirs:
            raise ValueError(
                f"image processor (patch_size, temporal_patch_size, merge_size)={ours} does not "
                f"match the model's vision_config {theirs}; fix the checkpoint's processor config"
            )
        self.image_token_id = hf_config.image_token_id
        self.video_token_id = getattr(hf_config, "video_token_id", None)
        self.use_normalization(s.image_mean, s.image_std, s.rescale_factor)
        self._merge = s.merge_size
        self._factor = s.patch_size * s.merge_size  # both sides of a resized image divide by it

    def prompt_settings(self, mm_processor_kwargs: dict) -> dict:
        """min_pixels / max_pixels for one prompt: the engine-wide values, updated by its kwargs."""
        base = {"min_pixels": self.settings.min_pixels, "max_pixels": self.settings.max_pixels}
        return check_kwargs(base, mm_processor_kwargs)

    def num_image_tokens(self, height: int, width: int, mm_processor_kwargs: dict) -> int:
        """Placeholder tokens an image of `height` x `width` pixels expands to."""
        kw = self.prompt_settings(mm_processor_kwargs or {})
        h, w = smart_resize(height, width, self._factor, kw["min_pixels"], kw["max_pixels"])
        return (h // self.settings.patch_size) * (w // self.settings.patch_size) // self._merge**2

    def preprocess(
        self, images: list[torch.Tensor], settings: dict
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 [3, H, W] images -> per image (pixel_values, image_grid_thw), no cache.

        pixel_values: [grid_h * grid_w, 3 * temporal_patch * patch * patch] model dtype, on device;
        image_grid_thw: [3] int64 on the CPU, (1, grid_h, grid_w).
        Images that share (input size, target size) are resized and normalized in one batch.
        """
        s = self.settings
        min_pixels, max_pixels = settings["min_pixels"], settings["max_pixels"]

        def finish(pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            height, width = pixels.shape[-2:]  # [B, 3, h, w] float32
            patches = patchify(pixels, s.patch_size, s.merge_size, s.temporal_patch_size)
            patches = patches.to(self.dtype)  # [B, gh * gw, 3 * T * p * p]
            grid_thw = torch.tensor([1, height // s.patch_size, width // s.patch_size])  # [3]
            return [(x, grid_thw) for x in patches]

        return self.preprocess_resized(
            images,
            lambda height, width: smart_resize(height, width, self._factor, min_pixels, max_pixels),
            "bicubic",
            finish,
        )

    def expand(
        self, image: torch.Tensor, output: tuple[torch.Tensor, torch.Tensor], settings: dict
    ) -> Expansion:
        pixel_values, grid_thw = output
        num_tokens = int(grid_thw.prod()) // self._merge**2
        data = {"pixel_values": pixel_values, "image_grid_thw": grid_thw}
        return Expansion([self.image_token_id] * num_tokens, 0, num_tokens, data)

    def prompt_extras(self, token_ids: list[int], features: list[MMFeature]) -> dict:
        """M-RoPE positions (HF `get_rope_index`): text counts on along all three axes; an
        image's tokens take (start, start + row, start + column), and the text after it starts
        at start + max(rows, columns)."""
        positions: list[torch.Tensor] = []  # [3, n] int64 pieces
        cursor = 0  # next token index without a position
        next_pos = 0  # next M-RoPE position
        for feature in features:
            num_text = feature.placeholder.offset - cursor
            positions.append(torch.arange(num_text).expand(3, -1) + next_pos)
            next_pos += num_text
            _, grid_h, grid_w = (int(x) for x in feature.data["image_grid_thw"])
            llm_h, llm_w = grid_h // self._merge, grid_w // self._merge
            rows = torch.arange(llm_h).repeat_interleave(llm_w)  # [num_tokens] row of each token
            cols = torch.arange(llm_w).repeat(llm_h)  # [num_tokens] column of each token
            positions.append(torch.stack([torch.zeros_like(rows), rows, cols]) + next_pos)
            next_pos += max(llm_h, llm_w)
            cursor = feature.placeholder.end
        num_text = len(token_ids) - cursor
        positions.append(torch.arange(num_text).expand(3, -1) + next_pos)
        next_pos += num_text
        # NOTE: positions never decrease along the prompt, so next_pos == max position + 1, and
        # this equals HF's `llm_positions.max() + 1 - len(input_ids)`.
        return {
            "mrope_positions": torch.cat(positions, dim=1),  # [3, num_tokens] int64
            "mrope_position_delta": next_pos - len(token_ids),
        }
