"""InternVL (transformers-native checkpoints) processor: dynamic tiling on the model's device.

Matches transformers 5.24 `InternVLProcessor` with its default image processor
`GotOcr2ImageProcessor` (torchvision backend), op for op:

```
uint8 [3, H, W]
  --grid (cols, rows): the closest aspect ratio with min_patches <= cols * rows <= max_patches
  --resize(bicubic, antialias, on uint8) to [rows * S, cols * S], cut into S x S tiles, row-major
  --plus a thumbnail (the whole image resized to S x S) when there is more than one tile
  --(x - mean * 255) / (std * 255) in float32--> pixel_values [num_tiles, 3, S, S]
```

`InternVLProcessor` passes `crop_to_patches=True` to the image processor (whatever the image
processor's own config says); `min_patches` / `max_patches` come from the image processor config
unless the call overrides them. Each image becomes `image_seq_length * num_tiles` embeddings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from vlmx.models.processing import (
    Expansion,
    ImageProcessorBase,
    preprocess_in_groups,
)
from vlmx.models.processor_settings import (
    BICUBIC,
    check_processor_flags,
    first_set,
    positive_int,
    reject_unknown_kwargs,
)

# mm_processor_kwargs: vLLM's names and HF's, each pair meaning the same thing.
KWARG_ALIASES = {
    "max_dynamic_patch": "max_patches",
    "max_patches": "max_patches",
    "min_dynamic_patch": "min_patches",
    "min_patches": "min_patches",
    "dynamic_image_size": "crop_to_patches",
    "crop_to_patches": "crop_to_patches",
}


@dataclass(frozen=True, slots=True)
class TileSettings:
    """Image-processor settings; the defaults are `GotOcr2ImageProcessor`'s class defaults."""

    tile_size: int = 384
    crop_to_patches: bool = True  # InternVLProcessor's images_kwargs default
    min_patches: int = 1
    max_patches: int = 12
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255


def normalize_kwargs(kwargs: dict) -> dict:
    """mm_processor_kwargs -> {crop_to_patches, min_patches, max_patches} (HF names), checked."""
    reject_unknown_kwargs(
        kwargs,
        KWARG_ALIASES,
        "InternVL",
        f"{', '.join(KWARG_ALIASES)} (max_dynamic_patch = max_patches, min_dynamic_patch = "
        "min_patches, dynamic_image_size = crop_to_patches)",
    )
    out: dict = {}
    for key, value in kwargs.items():
        name = KWARG_ALIASES[key]
        if name == "crop_to_patches":
            if not isinstance(value, bool):
                raise ValueError(f"mm_processor_kwargs {key}={value!r} must be True or False")
        else:
            positive_int(value, key)
        if name in out and out[name] != value:
            raise ValueError(
                f"mm_processor_kwargs give {name} twice with different values ({key}={value!r} "
                f"and {out[name]!r}); pass one of its names"
            )
        out[name] = value
    return out


def resolve_tile_settings(raw: dict, engine_kwargs: dict) -> TileSettings:
    """Defaults < image processor file < engine-wide `mm_processor_kwargs`."""
    check_processor_flags(raw, resample=(BICUBIC,))
    default = TileSettings()
    size = raw.get("size") or {}
    height = first_set(size.get("height"), default.tile_size)
    width = first_set(size.get("width"), default.tile_size)
    if height != width:
        raise ValueError(f"image processor size {size} is not square; InternVL tiles are square")
    settings = TileSettings(
        tile_size=int(height),
        min_patches=int(first_set(raw.get("min_patches"), default.min_patches)),
        max_patches=int(first_set(raw.get("max_patches"), default.max_patches)),
        image_mean=tuple(first_set(raw.get("image_mean"), default.image_mean)),
        image_std=tuple(first_set(raw.get("image_std"), default.image_std)),
        rescale_factor=float(first_set(raw.get("rescale_factor"), default.rescale_factor)),
    )
    return apply_kwargs(settings, engine_kwargs)


def apply_kwargs(settings: TileSettings, kwargs: dict) -> TileSettings:
    """`settings` updated by one set of mm_processor_kwargs, checked."""
    merged = replace(settings, **normalize_kwargs(kwargs))
    if merged.min_patches > merged.max_patches:
        raise ValueError(
            f"mm_processor_kwargs min_patches={merged.min_patches} is larger than "
            f"max_patches={merged.max_patches}"
        )
    return merged


@functools.lru_cache(maxsize=64)
def _tile_arrangements(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(cols, rows) with min_tiles <= cols * rows <= max_tiles, by tile count, stable
    (HF `get_all_supported_aspect_ratios`)."""
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(
    height: int, width: int, tile: int, min_tiles: int, max_tiles: int
) -> tuple[int, int]:
    """(cols, rows) of the tile grid for an image (HF `get_optimal_tiled_canvas`): the closest
    aspect ratio; on a tie, the later (larger) grid while the image covers more than half of it."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _tile_arrangements(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(height: int, width: int, s: TileSettings) -> int:
    """Tiles an image becomes: the grid, plus a thumbnail when the grid has more than one."""
    if not s.crop_to_patches:
        return 1
    cols, rows = tile_grid(height, width, s.tile_size, s.min_patches, s.max_patches)
    return cols * rows + (1 if cols * rows > 1 else 0)


class InternVLProcessor(ImageProcessorBase[torch.Tensor]):
    """The processor of InternVL's transformers-native checkpoints (`vlmx.models.interface`).

    ```
    prompt ids:  t t <IMG_CONTEXT> t                   one placeholder per image (chat template)
    expanded:    t t <img> C C ... C </img> t          image_seq_length * num_tiles C's
                            ^ PlaceholderRange: the C run only (HF scatters into those ids)
    ```
    A prompt that is already expanded (`<img>` + the exact run + `</img>`) is kept as it is.
    """

    shrink_images_hint = "mm_processor_kwargs={'max_dynamic_patch': ...}"
    image_processor_name = "GotOcr2ImageProcessor"
    placeholder_token = "<IMG_CONTEXT>"
    placeholder_hint = (
        "the chat template writes it for an {'type': 'image'} part; llm.chat does it for you"
    )
    video_token = "<video>"

    def configure(self, image_config: dict, processor: dict) -> None:
        hf_config = self.hf_config
        self.settings = resolve_tile_settings(image_config, self.engine_kwargs)
        vision = hf_config.vision_config
        image_size = vision.image_size
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        patch = vision.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        if self.settings.tile_size != image_size:
            raise ValueError(
                f"image processor tiles of {self.settings.tile_size} px do not match the vision "
                f"tower's image_size {image_size}; fix the checkpoint's processor config"
            )
        scale = int(round(1 / hf_config.downsample_ratio))
        tokens_per_tile = (image_size // patch // scale) ** 2
        self.image_seq_length = int(
            first_set(
                processor.get("image_seq_length"), getattr(hf_config, "image_seq_length", None)
            )
            or tokens_per_tile
        )
        if self.image_seq_length != tokens_per_tile:
            raise ValueError(
                f"image_seq_length {self.image_seq_length} does not match the model's "
                f"{tokens_per_tile} tokens per tile ((image_size / patch_size * "
                f"downsample_ratio) ** 2); fix the checkpoint's processor config"
            )
        self.image_token_id = hf_config.image_token_id
        self.start_token_id, self.end_token_id, self.video_token_id = self._named_token_ids()
        s = self.settings
        self.use_normalization(s.image_mean, s.image_std, s.rescale_factor)

    def _named_token_ids(self) -> tuple[int, int, int | None]:
        """Ids of <img>, </img> and <video>, read from the tokenizer as HF's processor does."""
        tokenizer = self.tokenizer
        vocab = tokenizer.get_vocab()
        start = getattr(tokenizer, "start_image_token", None) or "<img>"
        end = getattr(tokenizer, "end_image_token", None) or "</img>"
        video = getattr(tokenizer, "video_token", None) or "<video>"
        context = getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>"
        if vocab.get(context) != self.image_token_id:
            raise ValueError(
                f"the tokenizer's image token {context!r} has id {vocab.get(context)} but the "
                f"config's image_token_id is {self.image_token_id}"
            )
        if start not in vocab or end not in vocab:
            raise ValueError(f"the tokenizer lacks the image tokens {start!r} / {end!r}")
        return vocab[start], vocab[end], vocab.get(video)

    def prompt_settings(self, mm_processor_kwargs: dict) -> TileSettings:
        """Settings for one prompt: the engine-wide ones, updated by its kwargs."""
        return apply_kwargs(self.settings, mm_processor_kwargs)

    def num_image_tokens(self, height: int, width: int, mm_processor_kwargs: dict) -> int:
        """Embeddings (<IMG_CONTEXT> tokens) an image of `height` x `width` pixels becomes."""
        s = self.prompt_settings(mm_processor_kwargs or {})
        return self.image_seq_length * num_tiles(height, width, s)

    def preprocess(self, images: list[torch.Tensor], s: TileSettings) -> list[torch.Tensor]:
        """uint8 [3, H, W] images -> per image pixel_values [num_tiles, 3, S, S] (model dtype, on
        the device), no cache. Images that share (size, grid) are tiled in one batch."""
        tile = s.tile_size

        def key(image: torch.Tensor) -> tuple[int, ...]:
            height, width = image.shape[-2:]
            grid = tile_grid(height, width, tile, s.min_patches, s.max_patches)
            return (height, width, *(grid if s.crop_to_patches else (1, 1)))

        def run(group: tuple[int, ...], batch: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] uint8
            _, _, cols, rows = group
            b = batch.shape[0]
            canvas = self.resize(batch, rows * tile, cols * tile, "bicubic")  # [B, 3, rS, cS]
            tiles = canvas.reshape(b, 3, rows, tile, cols, tile).permute(0, 2, 4, 1, 3, 5)
            tiles = tiles.reshape(b, rows * cols, 3, tile, tile)  # row-major tiles
            if rows * cols > 1:
                thumb = self.resize(batch, tile, tile, "bicubic")  # [B, 3, S, S]
                tiles = torch.cat([tiles, thumb[:, None]], dim=1)
            return self.normalize(tiles).to(self.dtype)

        return preprocess_in_groups(images, key, self.device, run)  # [num_tiles, 3, S, S] each

    def expand(self, image: torch.Tensor, pixels: torch.Tensor, s: TileSettings) -> Expansion:
        num_tokens = self.image_seq_length * pixels.shape[0]
        token_ids = [self.start_token_id, *[self.image_token_id] * num_tokens, self.end_token_id]
        return Expansion(token_ids, 1, num_tokens, {"pixel_values": pixels})
