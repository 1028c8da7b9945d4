"""Pixel shuffle (space-to-depth) of a ViT's patch grid: fewer, wider tokens for the decoder.

Each `scale x scale` window of neighbouring patches becomes one token whose features are the
window's patch features concatenated, row by row:

```
patch grid 4x4 (features a..p), scale 2       -> 2x2 tokens of 4 * D features
  a b | c d                                        [a b e f]  [c d g h]
  e f | g h                                        [i j m n]  [k l o p]
  ----+----
  i j | k l        out[r, c] = concat(x[2r, 2c], x[2r, 2c+1], x[2r+1, 2c], x[2r+1, 2c+1])
  m n | o p        tokens row-major over the (H / scale, W / scale) grid
```

This is the layout of HF `Idefics3Connector.pixel_shuffle` / `SmolVLMConnector.pixel_shuffle`
(scale_factor=2, or 4 in SmolVLM-256M) and of InternVL's `pixel_shuffle` with
`ps_version="v2"` (downsample_ratio 0.5 == scale 2): both reshape-permute sequences reduce to the
single reshape below.
"""

from __future__ import annotations

import torch


def pixel_shuffle(x: torch.Tensor, height: int, width: int, scale: int) -> torch.Tensor:
    """[B, height * width, D] (patches row-major) -> [B, (height / s) * (width / s), s * s * D].

    s = scale. Channel layout of an output token: (row offset in window, column offset, feature).
    """
    b, n, d = x.shape
    if n != height * width or height % scale or width % scale:
        raise ValueError(
            f"pixel_shuffle needs a {height}x{width} grid divisible by scale {scale}, "
            f"got {n} patches"
        )
    x = x.reshape(b, height // scale, scale, width // scale, scale, d)
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, H/s, W/s, s (row), s (col), D]
    return x.reshape(b, (height // scale) * (width // scale), scale * scale * d)
