"""Deterministic synthetic images with structure (gradients, shapes) for demos and tests.

Random-noise images make poor test inputs: every patch looks alike and PNGs of them are large.
These have smooth colour fields and a few sharp shapes, so that swapping two images, cropping or
resizing visibly changes what a vision encoder sees.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

# (top-left, top-right, bottom-left, bottom-right) corner colours, one palette per variant mod 6.
_PALETTES = (
    ((250, 210, 60), (230, 80, 40), (40, 120, 200), (20, 40, 90)),
    ((20, 160, 120), (200, 240, 220), (90, 30, 120), (250, 120, 170)),
    ((240, 240, 240), (120, 120, 120), (60, 60, 60), (10, 10, 10)),
    ((255, 90, 0), (255, 200, 0), (0, 70, 160), (120, 0, 160)),
    ((30, 30, 80), (80, 200, 250), (250, 250, 180), (160, 220, 60)),
    ((190, 40, 60), (30, 30, 30), (240, 200, 160), (60, 160, 90)),
)


def structured_image(width: int, height: int, variant: int = 0) -> Image.Image:
    """An RGB `width` x `height` image: a four-corner colour gradient, a stripe band and a few
    filled shapes. The same arguments always give the same pixels; different variants differ in
    palette, stripe direction and the number, kind and place of the shapes.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    tl, tr, bl, br = (np.array(c, dtype=np.float32) for c in _PALETTES[variant % len(_PALETTES)])
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]  # [1, W, 1]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]  # [H, 1, 1]
    top = tl * (1 - x) + tr * x  # [1, W, 3]
    bottom = bl * (1 - x) + br * x
    pixels = top * (1 - y) + bottom * y  # [H, W, 3]

    rng = random.Random(1000 + variant)
    # A band of stripes across the middle, horizontal or vertical by variant.
    period = max(4, min(width, height) // rng.randint(6, 12))
    if variant % 2 == 0:
        band = (np.arange(width) // period % 2 == 0)[None, :, None]
        rows = slice(height // 3, height // 3 + max(1, height // 8))
        pixels[rows] = np.where(band, 255 - pixels[rows], pixels[rows])
    else:
        band = (np.arange(height) // period % 2 == 0)[:, None, None]
        cols = slice(width // 3, width // 3 + max(1, width // 8))
        pixels[:, cols] = np.where(band, 255 - pixels[:, cols], pixels[:, cols])
    image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    for _ in range(3 + variant % 4):
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        r = rng.uniform(0.06, 0.2) * min(width, height) + 1
        box = (cx - r, cy - r, cx + r, cy + r)
        colour = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse(box, fill=colour, outline=(0, 0, 0), width=max(1, int(r) // 8))
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    return image
