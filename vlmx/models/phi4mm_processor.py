"""Phi-4-multimodal's image processor and prompt placeholders, on the model's device.

Matches transformers 5 `Phi4MultimodalImageProcessor` (torchvision backend; the published
checkpoint's `Phi4MMImageProcessor` computes the same), op for op:

```
uint8 [3, H, W]
  --crop grid (w_crops, h_crops): ceil(W / S) x ceil(H / S), or, past dynamic_hd crops, the closest
    aspect ratio with at most dynamic_hd crops (`crop_layout`)
  --resize(bilinear, antialias, uint8) to fit [h*S, w*S] keeping the aspect ratio,
    pad right / bottom with 255--> HD canvas [3, h*S, w*S]
  --(x / 255 - 0.5) / 0.5--> float32
  --global view: the canvas resized to S x S (bicubic, no antialias, float32)
pixel_values [1 + h*w, 3, S, S]: the global view, then the canvas' crops row-major
patch_mask   [1 + h*w, S/p, S/p] bool: False on the patches that the padding fills (a whole
             patch of padding per 14 px of it, as HF counts)
```

Each image becomes `num_hd_tokens(uh, uw, S/p)` copies of the image token (`<|endoftext10|>`,
id 200010 in the published tokenizer), where (uh, uw) are the valid rows / columns of the
canvas' patch mask taken every second patch.

Prompts write `<|image_1|>`, `<|image_2|>`, ... (vLLM's example, the published processor): the
text between them is tokenized piece by piece, as the published processor does, and each tag
becomes one image token that `expand` replaces. A run of image tokens in `prompt_token_ids`
(one per image, or the expansion already in place) is accepted too. Audio (`<|audio_i|>`) is
refused: vlmx runs Phi-4-multimodal on images only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vlmx.layers.hd_transform import num_hd_tokens
from vlmx.models.processing import (
    Expansion,
    ImageProcessorBase,
    check_placeholder_count,
    find_token_runs,
    preprocess_in_groups,
)
from vlmx.models.processor_settings import (
    BICUBIC,
    check_processor_flags,
    first_set,
    positive_int,
    reject_unknown_kwargs,
)

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
AUDIO_TAG = re.compile(r"<\|audio_\d+\|>")
IMAGE_TOKEN_ID = 200010  # <|endoftext10|> in microsoft/Phi-4-multimodal-instruct
# mm_processor_kwargs: HF's name and the Phi-3.5-vision-style alias, both the crop limit
KWARG_ALIASES = {"dynamic_hd": "dynamic_hd", "num_crops": "dynamic_hd"}


@dataclass(frozen=True, slots=True)
class HDSettings:
    """The image processor's settings; defaults are `Phi4MultimodalImageProcessor`'s."""

    crop_size: int = 448
    patch_size: int = 14
    dynamic_hd: int = 36  # most crops per image (the global view not counted)
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255


@dataclass(frozen=True, slots=True)
class CropLayout:
    """Where an image goes on its HD canvas."""

    cols: int  # crops across
    rows: int  # crops down
    width: int  # the resized image's size, before padding
    height: int
    pad_width: int  # padding on the right / bottom
    pad_height: int


def _closest_ratio(aspect: float, width: int, height: int, size: int, max_num: int):
    """(cols, rows) with cols * rows <= max_num closest to `aspect`; on a tie the later (larger)
    grid while the image covers more than half of it (HF `find_closest_aspect_ratio`)."""
    grids = sorted(
        {(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if i * j <= max_num},
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def crop_layout(height: int, width: int, size: int, max_num: int) -> CropLayout:
    """HF `Phi4MultimodalImageProcessor._get_crop_layout` (min_num = 1)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    cols, rows = math.ceil(width / size), math.ceil(height / size)
    if cols * rows > max_num:
        cols, rows = _closest_ratio(width / height, width, height, size, max_num)
    target_w, target_h = size * cols, size * rows
    if target_w / width < target_h / height:
        new_w, new_h = target_w, int(height * (target_w / width))
    else:
        new_w, new_h = int(width * (target_h / height)), target_h
    if min(new_h, target_h) < 10 or min(new_w, target_w) < 10:
        raise ValueError(
            f"image of {height}x{width} pixels has too extreme an aspect ratio for Phi-4's "
            f"crops (it would be resized to {new_h}x{new_w})"
        )
    return CropLayout(cols, rows, new_w, new_h, target_w - new_w, target_h - new_h)


def canvas_patch_mask(layout: CropLayout, patch: int, side: int) -> torch.Tensor:
    """[rows * side, cols * side] bool: False on the patch rows / columns the padding fills."""
    mask = torch.ones(layout.rows * side, layout.cols * side, dtype=torch.bool)
    if layout.pad_width >= patch:
        mask[:, -(layout.pad_width // patch) :] = False
    if layout.pad_height >= patch:
        mask[-(layout.pad_height // patch) :, :] = False
    return mask


def useful_grid(mask: torch.Tensor) -> tuple[int, int]:
    """(uh, uw): the valid rows / columns of the canvas mask taken every second patch."""
    down = mask[0::2, 0::2]
    return int(down[:, 0].sum()), int(down[0, :].sum())


def image_token_count(height: int, width: int, s: HDSettings) -> int:
    """Image tokens an image of `height` x `width` becomes (HF `get_number_of_image_tokens`)."""
    side = s.crop_size // s.patch_size
    layout = crop_layout(height, width, s.crop_size, s.dynamic_hd)
    return num_hd_tokens(*useful_grid(canvas_patch_mask(layout, s.patch_size, side)), side)


def apply_kwargs(settings: HDSettings, kwargs: dict) -> HDSettings:
    """`settings` updated by one set of mm_processor_kwargs, checked."""
    reject_unknown_kwargs(
        kwargs, KWARG_ALIASES, "Phi-4-multimodal", "dynamic_hd (alias num_crops): most crops"
    )
    values = {positive_int(v, k) for k, v in kwargs.items()}
    if len(values) > 1:
        raise ValueError(
            f"mm_processor_kwargs give the crop limit twice with different values ({kwargs}); "
            "pass dynamic_hd only"
        )
    return replace(settings, dynamic_hd=values.pop()) if values else settings


HDEntry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # pixel_values, patch_mask, hd_layout


class Phi4MMProcessor(ImageProcessorBase[HDEntry]):
    """The processor of Phi-4-multimodal (`vlmx.models.interface.Processor`).

    ```
    text:      <|user|><|image_1|><|image_2|>What differs?<|end|><|assistant|>
    encoded:   <|user|> I I What differs ? <|end|> <|assistant|>          I = image token
    expanded:  <|user|> I*n1 I*n2 What ...                                 PlaceholderRange each
    ```
    """

    shrink_images_hint = "mm_processor_kwargs={'dynamic_hd': ...}"
    image_processor_name = "Phi4MultimodalImageProcessor"
    placeholder_token = "<|image_1|>"
    placeholder_example = "<|image_i|> (i = 1, 2, ...)"
    placeholder_hint = "as vLLM's example writes them; llm.chat does it for you"

    def configure(self, image_config: dict, processor_config: dict) -> None:
        check_processor_flags(image_config, resample=(BICUBIC,))
        size = image_config.get("size") or {}
        default = HDSettings()
        crop = first_set(size.get("height"), image_config.get("crop_size"), default.crop_size)
        if size.get("width", crop) != crop:
            raise ValueError(f"image processor size {size} is not square; Phi-4 crops are square")
        settings = HDSettings(
            crop_size=int(crop),
            patch_size=int(first_set(image_config.get("patch_size"), default.patch_size)),
            dynamic_hd=int(first_set(image_config.get("dynamic_hd"), default.dynamic_hd)),
            image_mean=tuple(first_set(image_config.get("image_mean"), default.image_mean)),
            image_std=tuple(first_set(image_config.get("image_std"), default.image_std)),
            rescale_factor=float(
                first_set(image_config.get("rescale_factor"), default.rescale_factor)
            ),
        )
        vision = self.hf_config.vision_config
        if (settings.crop_size, settings.patch_size) != (vision.image_size, vision.patch_size):
            raise ValueError(
                f"image processor crops of {settings.crop_size} px in {settings.patch_size} px "
                f"patches do not match the vision tower's {vision.image_size} / "
                f"{vision.patch_size}; fix the checkpoint's preprocessor config"
            )
        if (settings.crop_size // settings.patch_size) % 2:
            raise ValueError("Phi-4's 2x2 token compression needs an even number of patches")
        self.settings = apply_kwargs(settings, self.engine_kwargs)
        self.image_token_id = int(getattr(vision, "image_token_id", None) or IMAGE_TOKEN_ID)
        s = self.settings
        self.use_normalization(s.image_mean, s.image_std, s.rescale_factor)

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Prompt text -> ids, each `<|image_i|>` one image token (the text between the tags
        tokenized piece by piece, as the published processor does)."""
        if AUDIO_TAG.search(text):
            raise ValueError(
                "prompt holds audio placeholders (<|audio_i|>); vlmx runs Phi-4-multimodal on "
                "images only"
            )
        numbers = [int(n) for n in IMAGE_TAG.findall(text)]
        if numbers != list(range(1, len(numbers) + 1)):
            tags = ", ".join(f"<|image_{n}|>" for n in numbers)
            raise ValueError(
                f"the prompt's image tags are [{tags}]; write <|image_1|>, <|image_2|>, ... "
                "once each, in order"
            )
        pieces = IMAGE_TAG.split(text)[::2]  # text, (number), text, ...
        ids = self.tokenizer.encode(pieces[0], add_special_tokens=add_special_tokens)
        for piece in pieces[1:]:
            ids += [self.image_token_id, *self.tokenizer.encode(piece, add_special_tokens=False)]
        return ids

    def check_placeholders(self, prompt_token_ids: list[int], num_images: int) -> None:
        """One image token per image (adjacent tags make one run), unless a run is as long as
        an expansion: then `placeholder_spans` checks the prompt, once the sizes are known."""
        runs = find_token_runs(prompt_token_ids, self.image_token_id)
        side = self.settings.crop_size // self.settings.patch_size
        if all(end - start < num_hd_tokens(1, 1, side) for start, end in runs):
            found = sum(end - start for start, end in runs)
            check_placeholder_count(
                found, num_images, self.placeholder_token, self.placeholder_example,
                self.placeholder_hint,
            )  # fmt: skip

    def placeholder_spans(
        self, prompt_token_ids: list[int], expansions: list[Expansion]
    ) -> list[tuple[int, int]]:
        """Images in order through the runs of image tokens: where a run has at least an
        image's expansion left, the expansion is in place (HF's ids); else one token is the
        image's placeholder.

        ```
        ids:    t I I t        -> image 0 at [1, 2), image 1 at [2, 3)
        ids:    t I*n0 I*n1 t  -> image 0 at [1, 1 + n0), image 1 at [1 + n0, 1 + n0 + n1)
        ```
        """
        slots = find_token_runs(prompt_token_ids, self.image_token_id)
        spans, run, cursor = [], 0, None
        for image_idx, e in enumerate(expansions):
            if cursor is None or cursor == slots[run][1]:
                run += cursor is not None
                if run >= len(slots):
                    raise ValueError(
                        f"prompt has image tokens for {image_idx} images but {len(expansions)} "
                        f"images were given; put one {self.placeholder_example} per image"
                    )
                cursor = slots[run][0]
            length = e.length if slots[run][1] - cursor >= e.length else 1
            spans.append((cursor, cursor + length))
            cursor += length
        runs_used = 0 if cursor is None else run + 1
        if runs_used != len(slots) or (cursor is not None and cursor != slots[run][1]):
            raise ValueError(
                f"prompt has more image tokens than its {len(expansions)} images take: one per "
                "image (<|image_i|>), or each image's whole expansion"
            )
        return spans

    def prompt_settings(self, mm_processor_kwargs: dict) -> HDSettings:
        return apply_kwargs(self.settings, mm_processor_kwargs)

    def num_image_tokens(self, height: int, width: int, mm_processor_kwargs: dict) -> int:
        return image_token_count(height, width, self.prompt_settings(mm_processor_kwargs or {}))

    def preprocess(self, images: list[torch.Tensor], s: HDSettings) -> list[HDEntry]:
        """uint8 [3, H, W] images -> per image (pixel_values [1 + n, 3, S, S] (model dtype),
        patch_mask [1 + n, S/p, S/p] bool, hd_layout [4] int64 (rows, cols, uh, uw; CPU))."""
        size, side = s.crop_size, s.crop_size // s.patch_size

        def key(image: torch.Tensor) -> tuple[int, ...]:
            return tuple(image.shape[-2:])

        def run(group: tuple[int, ...], batch: torch.Tensor) -> list[HDEntry]:  # [B, 3, H, W] uint8
            layout = crop_layout(group[0], group[1], size, s.dynamic_hd)
            resized = self.resize(batch, layout.height, layout.width, "bilinear")
            canvas = F.pad(resized, (0, layout.pad_width, 0, layout.pad_height), value=255)
            canvas = self.normalize(canvas)  # [B, 3, rows * S, cols * S] float32
            glb = F.interpolate(canvas, size=(size, size), mode="bicubic", align_corners=False)
            b, rows, cols = batch.shape[0], layout.rows, layout.cols
            crops = canvas.reshape(b, 3, rows, size, cols, size).permute(0, 2, 4, 1, 3, 5)
            pixels = torch.cat([glb[:, None], crops.reshape(b, rows * cols, 3, size, size)], 1)
            mask = canvas_patch_mask(layout, s.patch_size, side)  # [rows * side, cols * side]
            crop_masks = mask.reshape(rows, side, cols, side).transpose(1, 2)
            crop_masks = crop_masks.reshape(rows * cols, side, side)
            masks = torch.cat([torch.ones(1, side, side, dtype=torch.bool), crop_masks])
            masks = masks.to(self.device, non_blocking=True)
            hd_layout = torch.tensor([rows, cols, *useful_grid(mask)], dtype=torch.int64)
            return [(p.to(self.dtype), masks, hd_layout) for p in pixels]

        return preprocess_in_groups(images, key, self.device, run)

    def expand(self, image: torch.Tensor, output: HDEntry, s: HDSettings) -> Expansion:
        pixels, mask, hd_layout = output
        _, _, uh, uw = hd_layout.tolist()
        num_tokens = num_hd_tokens(uh, uw, s.crop_size // s.patch_size)
        data = {"pixel_values": pixels, "patch_mask": mask, "hd_layout": hd_layout}
        return Expansion([self.image_token_id] * num_tokens, 0, num_tokens, data)
