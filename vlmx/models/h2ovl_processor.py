"""H2OVL-Mississippi processor: InternVL2's tiling plus multi-scale adaptive cropping (MSAC).

The published processor (the model repo's `image_process.py`; vLLM's `h2ovl.py` follows it):

```
prompt text:  ... <image> ...                   one `<image>` per image (written by the user)
ids:          ... <IMG_CONTEXT> ...             `encode_prompt`: one placeholder token per tag
expanded:     ... <img> C C ... C </img> ...    image_seq_length * num_tiles C's

uint8 [3, H, W]
  --grid (cols, rows): InternVL's closest aspect ratio over min..max_dynamic_patch tiles
  --resize(bicubic) to [rows * S, cols * S], S x S tiles row-major, + a thumbnail if 2+ tiles
MSAC (use_msac, one image per prompt only; off for 2+ images, as the reference):
  pass 1: grid g1 over 1..max tiles            -> tiles1 (+ thumbnail)
  pass 2: grid over 3..max tiles whose cols and rows both do not divide g1's
                                               -> tiles2 (+ thumbnail; one tile if none is left)
  pixel_values = tiles2 grid, tiles1 grid, then the thumbnail
  --(x / 255 - mean) / std (ImageNet)          -> [num_tiles, 3, S, S]
```

The tiling rules are InternVL's (`internvl_processor.tile_grid`); only the candidate grids of
pass 2 differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from vlmx.models.internvl_processor import (
    TileSettings,
    _tile_arrangements,
    apply_kwargs,
)
from vlmx.models.processing import Expansion, ImageProcessorBase, preprocess_in_groups

IMAGE_TAG = "<image>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_TAG = re.compile(re.escape(IMAGE_TAG))


@dataclass(frozen=True, slots=True)
class H2OVLSettings:
    """One prompt's settings: InternVL's tiling and whether MSAC runs."""

    tiles: TileSettings
    use_msac: bool


def closest_grid(
    height: int, width: int, tile: int, grids: tuple[tuple[int, int], ...]
) -> tuple[int, int]:
    """InternVL's rule over `grids` ((cols, rows), by tile count): the closest aspect ratio; on
    a tie the later grid while the image covers more than half of it; (1, 1) if none."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def msac_grids(height: int, width: int, s: TileSettings) -> tuple[tuple[int, int], ...]:
    """The tile grids of one image: one grid, or MSAC's two (pass 2 first)."""
    first = closest_grid(height, width, s.tile_size, _tile_arrangements(1, s.max_patches))
    candidates = tuple(
        (c, r)
        for c, r in _tile_arrangements(min(3, s.max_patches), s.max_patches)
        if c * r >= 3 and first[0] % c != 0 and first[1] % r != 0
    )
    return closest_grid(height, width, s.tile_size, candidates), first


def image_grids(height: int, width: int, s: H2OVLSettings) -> tuple[tuple[int, int], ...]:
    """(cols, rows) of each crop pass of an image, in pixel_values order."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    t = s.tiles
    if not t.crop_to_patches:
        return ((1, 1),)
    if s.use_msac:
        return msac_grids(height, width, t)
    return (
        closest_grid(height, width, t.tile_size, _tile_arrangements(t.min_patches, t.max_patches)),
    )


def num_tiles(height: int, width: int, s: H2OVLSettings) -> int:
    """Tiles of an image: its grids' tiles, plus one thumbnail when they have 2+ tiles."""
    grids = image_grids(height, width, s)
    total = sum(c * r for c, r in grids if c * r > 1)
    return total + 1  # the thumbnail, or the one tile


class H2OVLProcessor(ImageProcessorBase[torch.Tensor]):
    """The processor of the published H2OVL-Mississippi checkpoints (`vlmx.models.interface`).

    Settings: config.json's `min_dynamic_patch`, `max_dynamic_patch`, `dynamic_image_size`,
    `use_thumbnail`, `use_msac` < mm_processor_kwargs (the same names, vLLM's).
    """

    shrink_images_hint = "mm_processor_kwargs={'max_dynamic_patch': ...}"
    image_processor_name = None  # the settings are in config.json: no processor file to miss
    placeholder_token = IMAGE_TAG
    placeholder_hint = "write one '<image>' per image in the prompt; llm.chat does it for you"
    video_token = "<video>"

    def configure(self, image_config: dict, processor: dict) -> None:
        c = self.hf_config
        if not c.use_thumbnail:
            raise ValueError("use_thumbnail=False is not supported; H2OVL adds a thumbnail")
        vision = c.vision_config
        tile = (
            vision.image_size[0]
            if isinstance(vision.image_size, (list, tuple))
            else vision.image_size
        )
        patch = (
            vision.patch_size[0]
            if isinstance(vision.patch_size, (list, tuple))
            else vision.patch_size
        )
        base = TileSettings(
            tile_size=int(tile),
            crop_to_patches=bool(c.dynamic_image_size),
            min_patches=int(c.min_dynamic_patch),
            max_patches=int(c.max_dynamic_patch),
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        self.settings = self._apply(H2OVLSettings(base, bool(c.use_msac)), self.engine_kwargs)
        self.image_seq_length = (tile // patch // int(round(1 / c.downsample_ratio))) ** 2
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in ("<img>", "</img>", "<IMG_CONTEXT>") if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks H2OVL's image tokens {missing}")
        self.image_token_id = vocab["<IMG_CONTEXT>"]
        self.start_token_id, self.end_token_id = vocab["<img>"], vocab["</img>"]
        self.video_token_id = vocab.get(self.video_token)
        self.use_normalization(IMAGENET_MEAN, IMAGENET_STD, 1 / 255)

    @staticmethod
    def _apply(settings: H2OVLSettings, kwargs: dict) -> H2OVLSettings:
        kwargs = dict(kwargs)
        use_msac = kwargs.pop("use_msac", settings.use_msac)
        if not isinstance(use_msac, bool):
            raise ValueError(f"mm_processor_kwargs use_msac={use_msac!r} must be True or False")
        return H2OVLSettings(apply_kwargs(settings.tiles, kwargs), use_msac)

    def prompt_settings(self, mm_processor_kwargs: dict) -> H2OVLSettings:
        return self._apply(self.settings, mm_processor_kwargs)

    def process(
        self, prompt_token_ids: list[int], images: list[torch.Tensor], mm_processor_kwargs: dict
    ):
        """MSAC runs on single-image prompts only (the reference turns it off for 2+ images)."""
        kwargs = dict(mm_processor_kwargs or {})
        if len(images) > 1:
            kwargs["use_msac"] = False
        return super().process(prompt_token_ids, images, kwargs)

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Prompt text -> ids, each `<image>` one `<IMG_CONTEXT>` (the text between the tags
        tokenized piece by piece)."""
        pieces = _IMAGE_TAG.split(text)
        ids = self.tokenizer.encode(pieces[0], add_special_tokens=add_special_tokens)
        for piece in pieces[1:]:
            ids += [self.image_token_id, *self.tokenizer.encode(piece, add_special_tokens=False)]
        return ids

    def num_image_tokens(
        self, height: int, width: int, mm_processor_kwargs: dict, num_images: int = 1
    ) -> int:
        """Embeddings an image of `height` x `width` pixels becomes in a prompt of `num_images`."""
        s = self.prompt_settings(mm_processor_kwargs or {})
        s = s if num_images == 1 else replace(s, use_msac=False)
        return self.image_seq_length * num_tiles(height, width, s)

    def preprocess(self, images: list[torch.Tensor], s: H2OVLSettings) -> list[torch.Tensor]:
        """uint8 [3, H, W] images -> per image pixel_values [num_tiles, 3, S, S] (model dtype, on
        the device). Images that share (size, grids) are tiled in one batch."""
        tile = s.tiles.tile_size

        def key(image: torch.Tensor) -> tuple[int, ...]:
            height, width = image.shape[-2:]
            grids = image_grids(height, width, s)
            return (height, width, *(n for g in grids for n in g))

        def run(group: tuple[int, ...], batch: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] uint8
            b = batch.shape[0]
            parts = []
            for cols, rows in zip(group[2::2], group[3::2]):
                if cols * rows == 1:
                    continue  # the one tile is the thumbnail, below
                canvas = self.resize(batch, rows * tile, cols * tile, "bicubic")  # [B, 3, rS, cS]
                grid = canvas.reshape(b, 3, rows, tile, cols, tile).permute(0, 2, 4, 1, 3, 5)
                parts.append(grid.reshape(b, rows * cols, 3, tile, tile))  # row-major tiles
            thumb = self.resize(batch, tile, tile, "bicubic")  # [B, 3, S, S]
            tiles = torch.cat([*parts, thumb[:, None]], dim=1)  # [B, num_tiles, 3, S, S]
            return self.normalize(tiles).to(self.dtype)

        return preprocess_in_groups(images, key, self.device, run)

    def expand(self, image: torch.Tensor, pixels: torch.Tensor, s: H2OVLSettings) -> Expansion:
        num_tokens = self.image_seq_length * pixels.shape[0]
        token_ids = [self.start_token_id, *[self.image_token_id] * num_tokens, self.end_token_id]
        return Expansion(token_ids, 1, num_tokens, {"pixel_values": pixels})
