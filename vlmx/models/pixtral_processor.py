"""Pixtral / Mistral 3 processor: native-resolution images -> patches on the model's device, and
each `[IMG]` placeholder expanded to rows of image tokens.

Matches transformers 5.24 `PixtralProcessor` with `PixtralImageProcessor` (the default,
torchvision backend), which both families use:

```
uint8 [3, H, W] --bicubic antialias resize on uint8--> uint8 [3, h, w]
    h, w: scaled down (floor) so that max(h, w) <= longest_edge, then each rounded UP to a
    multiple of unit = patch_size * spatial_merge_size (Mistral 3: 2; Pixtral: 1)
  --.float(), (x - mean * 255) / (std * 255)--> float32 [3, h, w]
  --patchify--> [(h / p) * (w / p), 3 * p * p]   row-major patches, p = the tower's patch_size
```

The prompt layout of one image of `rows x cols` tokens (rows = h / unit, cols = w / unit):

```
[IMG] [IMG] [IMG] [IMG_BREAK]
[IMG] [IMG] [IMG] [IMG_BREAK]
[IMG] [IMG] [IMG] [IMG_END]          rows * (cols + 1) tokens
```

The whole block is one `PlaceholderRange`: the model's `encode_images` returns the image features
at the `[IMG]` rows and the embeddings of `[IMG_BREAK]` / `[IMG_END]` at theirs, so the runner can
copy the span as one piece.
"""

from __future__ import annotations

import math

import torch

from vlmx.layers.siglip import patchify
from vlmx.models.processing import (
    Expansion,
    ImageProcessorBase,
)
from vlmx.models.processor_settings import (
    BICUBIC,
    check_processor_flags,
    longest_edge_of,
    positive_int,
    reject_unknown_kwargs,
    special_token_id,
)

SUPPORTED_KWARGS = ("longest_edge", "size")
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # PixtralImageProcessor's class defaults
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_pixtral_vision(hf_config) -> None:
    """Llava checkpoints are supported only with a Pixtral vision tower."""
    model_type = getattr(getattr(hf_config, "vision_config", None), "model_type", None)
    if model_type != "pixtral":
        raise ValueError(
            f"this {type(hf_config).__name__} checkpoint has a {model_type!r} vision tower; vlmx "
            "supports LlavaForConditionalGeneration only with a Pixtral vision tower (e.g. "
            "mistral-community/pixtral-12b), not CLIP-based Llava such as llava-1.5"
        )


def resized_size(height: int, width: int, longest_edge: int, unit: int) -> tuple[int, int]:
    """HF `get_resize_output_image_size` of Pixtral: the (h, w) an image is resized to."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        # NOTE: floor, as HF does, so the longest edge never exceeds longest_edge.
        height, width = math.floor(height / ratio), math.floor(width / ratio)
    if height < 1 or width < 1:
        raise ValueError(
            f"an image is too elongated for longest_edge={longest_edge}: one side shrinks to 0 "
            "pixels; crop or pad it first"
        )
    return ((height - 1) // unit + 1) * unit, ((width - 1) // unit + 1) * unit


def image_token_layout(rows: int, cols: int, img: int, brk: int, end: int) -> list[int]:
    """`rows` rows of `cols` image tokens, each row closed by [IMG_BREAK], the last by [IMG_END]."""
    layout = ([img] * cols + [brk]) * rows
    layout[-1] = end
    return layout


def _patch_int(value, name: str) -> int:
    """An int patch size from `16` or `{"height": 16, "width": 16}`."""
    if isinstance(value, dict):
        if value.get("height") != value.get("width"):
            raise ValueError(f"{name} {value} is not square; vlmx supports square patches only")
        value = value.get("height")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


def check_kwargs(longest_edge: int, overrides: dict) -> int:
    """The longest edge for one prompt: the engine-wide value, updated by mm_processor_kwargs."""
    reject_unknown_kwargs(
        overrides,
        SUPPORTED_KWARGS,
        "Pixtral / Mistral 3",
        "longest_edge (int) or size={'longest_edge': int}",
    )
    if "size" in overrides:  # NOTE: Pixtral resizes by the longest edge only
        longest_edge = longest_edge_of(overrides["size"], "size")
    return positive_int(overrides.get("longest_edge", longest_edge), "longest_edge")


class PixtralProcessor(ImageProcessorBase[tuple[torch.Tensor, torch.Tensor]]):
    """The processor of Llava-Pixtral and Mistral 3 (see `vlmx.models.interface`).

    A prompt holds one `[IMG]` per image (vLLM's form, and what the chat templates write), which
    is expanded to the layout above; or an image's block is already expanded (e.g. the ids the
    HF processor returns), which is kept as it is when it equals the layout of that image.
    """

    shrink_images_hint = "mm_processor_kwargs={'longest_edge': ...}"
    image_processor_name = "PixtralImageProcessor"
    placeholder_token = "[IMG]"

    def configure(self, image: dict, processor: dict) -> None:
        hf_config = self.hf_config
        check_pixtral_vision(hf_config)
        check_processor_flags(image, resample=(BICUBIC,))
        size = image.get("size") or {"longest_edge": 1024}
        if "longest_edge" not in size:
            raise ValueError(
                f"image processor size {size} is not supported; vlmx needs longest_edge"
            )

        vision = hf_config.vision_config
        self.patch_size = _patch_int(processor.get("patch_size", vision.patch_size), "patch_size")
        self.merge_size = int(processor.get("spatial_merge_size", 1))
        model_merge = int(getattr(hf_config, "spatial_merge_size", 1))
        if (self.patch_size, self.merge_size) != (vision.patch_size, model_merge):
            raise ValueError(
                f"processor (patch_size, spatial_merge_size)=({self.patch_size}, "
                f"{self.merge_size}) does not match the model's ({vision.patch_size}, "
                f"{model_merge}); fix the checkpoint's processor_config.json"
            )
        self.unit = self.patch_size * self.merge_size  # pixels per image token, each side
        self.longest_edge = check_kwargs(size["longest_edge"], self.engine_kwargs)
        self.use_normalization(
            image.get("image_mean", _CLIP_MEAN),
            image.get("image_std", _CLIP_STD),
            float(image.get("rescale_factor", 1 / 255)),
        )

        self.token_names = {
            key: processor.get(key, default)
            for key, default in (
                ("image_token", "[IMG]"),
                ("image_break_token", "[IMG_BREAK]"),
                ("image_end_token", "[IMG_END]"),
            )
        }
        ids = {}
        for key, name in self.token_names.items():
            ids[key] = special_token_id(self.tokenizer, name)
            if ids[key] is None:
                raise ValueError(f"the tokenizer has no {key} {name!r}")
        self.placeholder_token = self.token_names["image_token"]
        self.image_token_id = hf_config.image_token_id
        if ids["image_token"] != self.image_token_id:
            raise ValueError(
                f"the tokenizer's {self.token_names['image_token']} is id {ids['image_token']} "
                f"but the config's image_token_index is {self.image_token_id}"
            )
        self.image_break_token_id: int = ids["image_break_token"]
        self.image_end_token_id: int = ids["image_end_token"]

    def prompt_settings(self, mm_processor_kwargs: dict) -> dict:
        """The settings that shape one prompt's images (part of each image's mm_hash)."""
        return {
            "longest_edge": check_kwargs(self.longest_edge, mm_processor_kwargs),
            "unit": self.unit,
        }

    def num_image_tokens(self, height: int, width: int, mm_processor_kwargs: dict) -> int:
        """Prompt tokens (image tokens, breaks and the end token) an image expands to."""
        longest_edge = self.prompt_settings(mm_processor_kwargs or {})["longest_edge"]
        h, w = resized_size(height, width, longest_edge, self.unit)
        return (h // self.unit) * (w // self.unit + 1)

    def preprocess(
        self, images: list[torch.Tensor], settings: dict
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 [3, H, W] images -> per image (pixel_values, image_size), no cache.

        pixel_values: [(h / p) * (w / p), 3 * p * p] model dtype, on the device;
        image_size: [2] int64 on the CPU, the resized (h, w) in pixels.
        Images that share (input size, target size) are resized and normalized in one batch.
        """
        longest_edge = settings["longest_edge"]

        def target(height: int, width: int) -> tuple[int, int]:
            return resized_size(height, width, longest_edge, self.unit)

        def finish(pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            image_size = torch.tensor(pixels.shape[-2:])  # [2] int64 (h, w), CPU
            patches = patchify(pixels, self.patch_size).to(self.dtype)  # [B, n, 3 * p * p]
            return [(x, image_size) for x in patches]

        return self.preprocess_resized(images, target, "bicubic", finish)

    def expand(
        self, image: torch.Tensor, output: tuple[torch.Tensor, torch.Tensor], settings: dict
    ) -> Expansion:
        pixel_values, image_size = output
        h, w = (int(x) for x in image_size)
        layout = image_token_layout(
            h // self.unit,
            w // self.unit,
            self.image_token_id,
            self.image_break_token_id,
            self.image_end_token_id,
        )
        data = {
            "pixel_values": pixel_values,  # [(h / p) * (w / p), 3 * p * p] on the device
            "image_size": image_size,  # [2] int64 resized (h, w), CPU
            "token_ids": torch.tensor(layout),  # [num_embeds] int64 block ids, CPU
        }
        return Expansion(layout, 0, len(layout), data)

    def check_placeholders(self, prompt_token_ids: list[int], num_images: int) -> None:
        """Checked by `placeholder_spans`, once each image's layout is known."""

    def placeholder_spans(
        self, ids: list[int], expansions: list[Expansion]
    ) -> list[tuple[int, int]]:
        return self._find_placeholders(ids, [e.token_ids for e in expansions])

    def _find_placeholders(self, ids: list[int], layouts: list[list[int]]) -> list[tuple[int, int]]:
        """(start, end) in `ids` of each image's placeholder: its whole block when the prompt
        already holds exactly image k's layout there, else a single [IMG]."""
        img, brk, end = self.image_token_id, self.image_break_token_id, self.image_end_token_id
        names = self.token_names
        spans: list[tuple[int, int]] = []
        i = 0
        while i < len(ids):
            if ids[i] == img and len(spans) < len(layouts):
                layout = layouts[len(spans)]
                size = len(layout) if ids[i : i + len(layout)] == layout else 1
                spans.append((i, i + size))
                i += size
            elif ids[i] == img:  # more placeholders than images: count the rest and stop
                num = len(spans) + self._count_placeholders(ids[i:])
                raise self._mismatch(ids, layouts, f"{num} image placeholders")
            elif ids[i] in (brk, end):
                token = names["image_break_token" if ids[i] == brk else "image_end_token"]
                raise self._mismatch(ids, layouts, f"{token} at token {i} outside any image block")
            else:
                i += 1
        if len(spans) != len(layouts):
            raise self._mismatch(ids, layouts, f"{len(spans)} image placeholders")
        return spans

    def _mismatch(self, ids: list[int], layouts: list[list[int]], found: str) -> ValueError:
        """The error for placeholders that do not fit the images, with how to fix the prompt."""
        img, brk = self.token_names["image_token"], self.image_break_token_id
        message = (
            f"prompt has {found} ({img}) but {len(layouts)} images were given; put one {img} in "
            "the prompt per image (llm.chat writes them for you)"
        )
        if brk in ids or self.image_end_token_id in ids:
            shapes = ", ".join(
                f"image {k}: {layout.count(brk) + 1} rows of "
                f"{layout.count(self.image_token_id) // (layout.count(brk) + 1)} {img}"
                for k, layout in enumerate(layouts)
            )
            message += (
                f"; an already expanded block must be exactly its image's layout ({shapes}, "
                f"rows closed by {self.token_names['image_break_token']}, the last by "
                f"{self.token_names['image_end_token']})"
            )
        return ValueError(message)

    def _count_placeholders(self, prompt_token_ids: list[int]) -> int:
        """Images the prompt refers to: one per [IMG] that no break or end token follows within
        its run of image tokens, plus one per [IMG_END] (an expanded block)."""
        count = 0
        in_block = False  # inside an expanded block: an [IMG] run followed by a break
        img, brk, end = self.image_token_id, self.image_break_token_id, self.image_end_token_id
        ids = prompt_token_ids
        i = 0
        while i < len(ids):
            if ids[i] == img:
                j = i
                while j < len(ids) and ids[j] == img:
                    j += 1
                if j < len(ids) and ids[j] in (brk, end):
                    in_block = True  # a row of an expanded block
                    i = j
                    continue
                if not in_block:
                    count += j - i  # separate short placeholders
                i = j
                continue
            if ids[i] == end:
                count += 1
                in_block = False
            i += 1
        return count
