"""Mllama (Llama 3.2 Vision) processor: aspect-ratio tiling on the model's device.

Matches transformers 5.24 `MllamaImageProcessor` (torchvision backend) and `MllamaProcessor`:

```
uint8 [3, H, W]
  --canvas (rows, cols): of the arrangements rows * cols <= max_image_tiles, the one that
    upscales least (else downscales least), the smallest area on a tie (get_optimal_tiled_canvas)
  --resize(bilinear, antialias, on uint8) to fit the canvas, aspect kept (fit_to_canvas)
  --pad right / bottom with 0 to [rows * S, cols * S], cut into S x S tiles, row-major
  --(x - mean * 255) / (std * 255) in float32, zero tiles up to max_image_tiles
  --> pixel_values [max_image_tiles, 3, S, S], aspect_ratio_id = index of (rows, cols) + 1
```

The prompt keeps its `<|image|>` tokens as they are (one per image; the decoder cross-attends
to the images instead of reading their embeddings in its input). Each image's `MMFeature` covers
its one `<|image|>` token; `data` holds its tiles, aspect ratio id and tile count, from which the
model builds the cross-attention states and the worker the cross-attention mask.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

from vlmx.models.processing import Expansion, ImageProcessorBase, preprocess_in_groups
from vlmx.models.processor_settings import (
    BILINEAR,
    check_processor_flags,
    first_set,
    positive_int,
    reject_unknown_kwargs,
    require_token_id,
)
from vlmx.multimodal.inputs import ProcessedPrompt

IMAGE_TOKEN = "<|image|>"
Entry = tuple[torch.Tensor, torch.Tensor]  # (pixel_values, [rows, cols])
SUPPORTED_KWARGS = ("max_image_tiles",)


@dataclass(frozen=True, slots=True)
class MllamaSettings:
    """Image-processor settings; the defaults are `MllamaImageProcessor`'s class defaults."""

    tile_size: int = 224
    max_image_tiles: int = 4
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_STD
    rescale_factor: float = 1 / 255


@functools.lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Tile arrangements (a, b) with a * b <= max_image_tiles, in HF's order (its ids - 1)."""
    n = max_image_tiles
    return tuple((a, b) for a in range(1, n + 1) for b in range(1, n + 1) if a * b <= n)


@functools.lru_cache(maxsize=1024)
def tile_canvas(height: int, width: int, max_image_tiles: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of the canvas an image is fitted into (HF `get_optimal_tiled_canvas`): the
    least upscaling >= 1, else the least downscaling, then the smallest area."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    options = []
    for rows, cols in supported_aspect_ratios(max_image_tiles):
        scale_h, scale_w = rows * tile / height, cols * tile / width
        options.append((scale_h if scale_w > scale_h else scale_w, rows, cols))
    up = [s for s, _, _ in options if s >= 1]
    chosen = min(up) if up else max(s for s, _, _ in options if s < 1)
    _, _, rows, cols = min((r * c, i, r, c) for i, (s, r, c) in enumerate(options) if s == chosen)
    return rows, cols


def fit_to_canvas(
    height: int, width: int, canvas_h: int, canvas_w: int, tile: int
) -> tuple[int, int]:
    """(height, width) the image is resized to (HF `get_image_size_fit_to_canvas`)."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def cross_attention_spans(image_offsets: list[int]) -> list[tuple[int, int | None]]:
    """(first, end) token positions from which each image is visible to the text (end None:
    to the end of the sequence, generated tokens included), HF `get_cross_attention_token_mask`:
    an image is visible from its `<|image|>` token up to the next image's token, and a run of
    adjacent `<|image|>` tokens shares the end of the run's last image.

    ```
    <|image|><|image|> t t <|image|> t t      spans: (0, 3), (1, 3), (3, None)
    ```
    Generated tokens see what the prompt's last token sees (HF repeats its mask row).
    """
    ends: list[int | None] = [*image_offsets[1:], None]
    for i in range(len(image_offsets) - 2, -1, -1):
        if image_offsets[i + 1] == image_offsets[i] + 1:
            ends[i] = ends[i + 1]
    return list(zip(image_offsets, ends, strict=True))


def resolve_settings(raw: dict, engine_kwargs: dict) -> MllamaSettings:
    """Defaults < image processor file < engine-wide `mm_processor_kwargs`."""
    check_processor_flags(raw, ("do_resize", "do_rescale", "do_normalize", "do_pad"), (BILINEAR,))
    default = MllamaSettings()
    size = raw.get("size") or {}
    height = first_set(size.get("height"), default.tile_size)
    width = first_set(size.get("width"), default.tile_size)
    if height != width:
        raise ValueError(f"image processor size {size} is not square; Mllama tiles are square")
    settings = MllamaSettings(
        tile_size=int(height),
        max_image_tiles=int(first_set(raw.get("max_image_tiles"), default.max_image_tiles)),
        image_mean=tuple(first_set(raw.get("image_mean"), default.image_mean)),
        image_std=tuple(first_set(raw.get("image_std"), default.image_std)),
        rescale_factor=float(first_set(raw.get("rescale_factor"), default.rescale_factor)),
    )
    return apply_kwargs(settings, engine_kwargs)


def apply_kwargs(settings: MllamaSettings, kwargs: dict) -> MllamaSettings:
    reject_unknown_kwargs(kwargs, SUPPORTED_KWARGS, "Mllama")
    for key, value in kwargs.items():
        positive_int(value, key)
    return replace(settings, **kwargs)


class MllamaProcessor(ImageProcessorBase[tuple[torch.Tensor, torch.Tensor]]):
    """The processor of Mllama checkpoints (`vlmx.models.interface`).

    ```
    prompt ids:  <|image|> <|image|> <|begin_of_text|> t t t     one token per image, kept
    features:    image 0 at 0, image 1 at 1 (PlaceholderRange(offset, 1))
    ```
    """

    shrink_images_hint = "mm_processor_kwargs={'max_image_tiles': ...}"
    image_processor_name = "MllamaImageProcessor"
    placeholder_token = IMAGE_TOKEN
    placeholder_hint = "e.g. '<|image|><|image|><|begin_of_text|>question'; llm.chat does it"

    def configure(self, image_config: dict, processor_config: dict) -> None:
        hf_config = self.hf_config
        self.settings = resolve_settings(image_config, self.engine_kwargs)
        vision = hf_config.vision_config
        if self.settings.tile_size != vision.image_size:
            raise ValueError(
                f"image processor tiles of {self.settings.tile_size} px do not match the vision "
                f"tower's image_size {vision.image_size}; fix the checkpoint's processor config"
            )
        self.max_model_tiles = vision.max_num_tiles
        self._check_tiles(self.settings)
        self.image_token_id = require_token_id(self.tokenizer, IMAGE_TOKEN, "Mllama")
        if self.image_token_id != hf_config.image_token_index:
            raise ValueError(
                f"the tokenizer's {IMAGE_TOKEN} has id {self.image_token_id} but the config's "
                f"image_token_index is {hf_config.image_token_index}"
            )
        # The decoder embeds 8 ids past the text vocabulary (the image token among them).
        self.input_vocab_size = hf_config.text_config.vocab_size + 8
        # NOTE: as vLLM, one image per prompt unless limit_mm_per_prompt says more: each image
        # holds cross-attention K/V on the worker for its request's whole life.
        self.max_images = self.max_images_per_prompt or 1
        s = self.settings
        self.use_normalization(s.image_mean, s.image_std, s.rescale_factor)

    def __init__(self, model_config, *args, **kwargs) -> None:
        self.max_images_per_prompt = model_config.max_images_per_prompt
        super().__init__(model_config, *args, **kwargs)

    def prompt_extras(self, token_ids: list[int], features: list) -> dict:
        """Every image shapes every token's KV (text before the first image attends to all of
        them, as in HF), so all of them key the prompt's first KV block."""
        return {"prefix_extra_keys": tuple(f.mm_hash for f in features)}

    def _check_tiles(self, s: MllamaSettings) -> None:
        if s.max_image_tiles != self.max_model_tiles:
            raise ValueError(
                f"max_image_tiles={s.max_image_tiles} differs from the vision tower's "
                f"max_num_tiles={self.max_model_tiles} (its aspect-ratio embeddings are sized "
                "for it); keep the checkpoint's value"
            )

    def prompt_settings(self, mm_processor_kwargs: dict) -> MllamaSettings:
        settings = apply_kwargs(self.settings, mm_processor_kwargs)
        self._check_tiles(settings)
        return settings

    def process(
        self, prompt_token_ids: list[int], images: list[torch.Tensor], mm_processor_kwargs: dict
    ) -> ProcessedPrompt:
        if len(images) > self.max_images:
            raise ValueError(
                f"prompt has {len(images)} images but Mllama takes {self.max_images} per prompt "
                f"here (limit_mm_per_prompt={{'image': {self.max_images}}}); raise "
                "limit_mm_per_prompt"
            )
        return super().process(self.with_bos(prompt_token_ids), images, mm_processor_kwargs)

    def with_bos(self, ids: list[int]) -> list[int]:
        """HF `build_string_from_input` on ids: a prompt with no `<|begin_of_text|>` (besides
        the one the tokenizer puts first) gets one after its leading `<|image|>` tokens.

        ```
        [bos] <|image|> What ...          ->  [bos] <|image|> <|begin_of_text|> What ...
        [bos] <|image|> <|begin_of_text|> ...   unchanged
        ```
        """
        bos = self.tokenizer.bos_token_id
        first = 1 if ids[:1] == [bos] else 0
        if bos is None or bos in ids[first:]:
            return ids
        at = first
        while at < len(ids) and ids[at] == self.image_token_id:
            at += 1
        return [*ids[:at], bos, *ids[at:]]

    def num_image_tokens(self, height: int, width: int, mm_processor_kwargs: dict) -> int:
        """Vision tokens (cross-attention keys that are not padding) of an image."""
        vision = self.hf_config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
        return per_tile * self.num_tiles(height, width, mm_processor_kwargs)

    def count_placeholders(self, prompt_token_ids: list[int]) -> int:
        """One image per `<|image|>` token (adjacent ones are separate images)."""
        return prompt_token_ids.count(self.image_token_id)

    def placeholder_spans(
        self, prompt_token_ids: list[int], expansions: list[Expansion]
    ) -> list[tuple[int, int]]:
        positions = [i for i, t in enumerate(prompt_token_ids) if t == self.image_token_id]
        return [(i, i + 1) for i in positions]

    def num_tiles(self, height: int, width: int, mm_processor_kwargs: dict | None = None) -> int:
        s = self.prompt_settings(mm_processor_kwargs or {})
        rows, cols = tile_canvas(height, width, s.max_image_tiles, s.tile_size)
        return rows * cols

    def preprocess(
        self, images: list[torch.Tensor], s: MllamaSettings
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 [3, H, W] images -> per image (pixel_values [max_image_tiles, 3, S, S] in the
        model's dtype on the device, [rows, cols] int64 on the CPU). Images of one size and
        canvas are tiled in one batch."""
        tile, max_tiles = s.tile_size, s.max_image_tiles

        def key(image: torch.Tensor) -> tuple[int, ...]:
            height, width = image.shape[-2:]
            rows, cols = tile_canvas(height, width, max_tiles, tile)
            new_size = fit_to_canvas(height, width, rows * tile, cols * tile, tile)
            return (height, width, rows, cols, *new_size)

        def run(group: tuple[int, ...], batch: torch.Tensor) -> list[Entry]:
            _, _, rows, cols, new_h, new_w = group
            b = batch.shape[0]
            resized = self.resize(batch, new_h, new_w, "bilinear")  # [B, 3, h, w] uint8
            pad = (0, cols * tile - new_w, 0, rows * tile - new_h)
            canvas = torch.nn.functional.pad(resized, pad)  # [B, 3, rows * S, cols * S]
            tiles = canvas.reshape(b, 3, rows, tile, cols, tile).permute(0, 2, 4, 1, 3, 5)
            tiles = self.normalize(tiles.reshape(b, rows * cols, 3, tile, tile))
            padded = tiles.new_zeros(b, max_tiles, 3, tile, tile)
            padded[:, : rows * cols] = tiles
            grid = torch.tensor([rows, cols])
            return [(pixels.to(self.dtype), grid) for pixels in padded]

        return preprocess_in_groups(images, key, self.device, run)

    def expand(
        self, image: torch.Tensor, output: tuple[torch.Tensor, torch.Tensor], s: MllamaSettings
    ) -> Expansion:
        pixels, grid = output
        rows, cols = grid.tolist()
        ratio_id = supported_aspect_ratios(s.max_image_tiles).index((rows, cols)) + 1
        data = {
            "pixel_values": pixels,  # [max_image_tiles, 3, S, S]
            "aspect_ratio_id": torch.tensor(ratio_id),
            "num_tiles": torch.tensor(rows * cols),
        }
        return Expansion([self.image_token_id], 0, 1, data)
