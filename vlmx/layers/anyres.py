"""AnyRes tiling (LLaVA-NeXT / LLaVA-OneVision): an image is resized into the best of a list of
tile canvases (`image_grid_pinpoints`), cut into square tiles and encoded with a downscaled copy
of the whole image (the base); the tiles' feature grids are stitched back into one grid, the
padding cropped off ("unpadding"), scaled down bilinearly when it holds too many features
(`anyres_max_N`), and each row ends with the `image_newline` embedding.

```
image (h, w) --best_resolution--> canvas (H, W) = (rows * S, cols * S)
  tiles [rows * cols, side * side, D]  --stitch-->  grid [D, rows * side, cols * side]
  --crop the padding rows / columns-->  [D, gh, gw]
  --bilinear to (gh // r, gw // r) when r = sqrt(gh * gw / (N * side**2)) > 1.1-->  [D, oh, ow]
  --a newline column, row-major-->  [oh * (ow + 1), D]   after the base's [side * side, D]
```

The arithmetic is HF's, op for op (`select_best_resolution`, `get_patch_output_size`,
`unpad_image`, `LlavaOnevisionModel.pack_image_features`, and the processor's
`_get_unpadded_features`), so that the processor's token counts and the model's features agree
with transformers for every image size. Pure functions of sizes, shared by the processor (counts,
pixels) and the model (features).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Size = tuple[int, int]  # (height, width)


def best_resolution(height: int, width: int, pinpoints: list[Size]) -> Size:
    """The canvas (height, width) that keeps most of the image's pixels when it is scaled to
    fit, then wastes the least area (HF `select_best_resolution`)."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        scaled_w, scaled_h = int(width * scale), int(height * scale)
        effective = min(scaled_w * scaled_h, width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (canvas_h, canvas_w), effective, wasted
    assert best is not None, "no grid pinpoints"
    return best


def fit_size(height: int, width: int, canvas_h: int, canvas_w: int) -> Size:
    """The image's size scaled to fit the canvas, aspect kept (HF `get_patch_output_size`)."""
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def max_tiles_of(vision_aspect_ratio: str) -> int:
    """N of `anyres_max_N`: the tiles' worth of features a grid may keep unscaled."""
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"vision_aspect_ratio {vision_aspect_ratio!r} is not supported; LLaVA-OneVision "
            "checkpoints use 'anyres_max_N' (e.g. 'anyres_max_9')"
        )
    return int(match.group(1))


@dataclass(frozen=True, slots=True)
class AnyResLayout:
    """Where an image's tile features go: the tile grid, the rows and columns of the stitched
    feature grid that hold the image (the rest is padding), and the grid's final size."""

    rows: int  # tiles down the canvas
    cols: int  # tiles across
    top: int  # feature rows [top, bottom) and columns [left, right) of the unpadded grid
    bottom: int
    left: int
    right: int
    out_h: int  # the grid's size after the optional downscale
    out_w: int

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def scaled(self) -> bool:
        return (self.out_h, self.out_w) != (self.bottom - self.top, self.right - self.left)

    @property
    def num_grid_features(self) -> int:
        """Embeddings of the tiles' part: each output row and its newline."""
        return self.out_h * (self.out_w + 1)


def anyres_layout(
    height: int, width: int, pinpoints: list[Size], tile: int, side: int, max_tiles: int
) -> AnyResLayout:
    """The layout of an image of (height, width) pixels, tiles of `tile` pixels and `side` x
    `side` features each."""
    canvas_h, canvas_w = best_resolution(height, width, pinpoints)
    rows, cols = canvas_h // tile, canvas_w // tile
    grid_h, grid_w = rows * side, cols * side
    top, bottom, left, right = 0, grid_h, 0, grid_w
    if width / height > grid_w / grid_h:  # HF `unpad_image`: padding above and below
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        top, bottom = pad, grid_h - pad
    else:  # padding left and right (or none)
        new_w = int(round(width * (grid_h / height), 7))
        pad = (grid_w - new_w) // 2
        left, right = pad, grid_w - pad
    cur_h, cur_w = bottom - top, right - left
    out_h, out_w = cur_h, cur_w
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
    if ratio > 1.1:
        out_h, out_w = int(cur_h // ratio), int(cur_w // ratio)
    return AnyResLayout(rows, cols, top, bottom, left, right, out_h, out_w)


def pack_anyres_features(
    tiles: torch.Tensor,  # [rows * cols, side * side, D], row-major tiles
    layout: AnyResLayout,
    newline: torch.Tensor,  # [D]
) -> torch.Tensor:
    """The tiles' features stitched, unpadded, scaled and given a newline per row:
    [layout.num_grid_features, D] (HF `pack_image_features` without the base)."""
    n, tokens, dim = tiles.shape
    side = math.isqrt(tokens)
    assert n == layout.num_tiles and side * side == tokens, (tiles.shape, layout)
    grid = tiles.view(layout.rows, layout.cols, side, side, dim)
    grid = grid.permute(4, 0, 2, 1, 3).reshape(dim, layout.rows * side, layout.cols * side)
    grid = grid[:, layout.top : layout.bottom, layout.left : layout.right]  # [D, gh, gw]
    if layout.scaled:
        grid = F.interpolate(grid[None], [layout.out_h, layout.out_w], mode="bilinear")[0]
    column = newline.to(grid.dtype)[:, None, None].expand(dim, layout.out_h, 1)
    grid = torch.cat([grid, column], dim=-1)  # [D, oh, ow + 1]
    return grid.flatten(1).transpose(0, 1)  # [oh * (ow + 1), D]
