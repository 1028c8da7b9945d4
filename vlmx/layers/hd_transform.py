"""Phi-4-multimodal's HD image layout: crop features compressed 2x2, laid out row by row with a
learned separator closing each row, the crops' grid before the global view, then a two-layer MLP.

Matches HF `Phi4MultimodalImageEmbedding` (transformers 5; the published checkpoint's
`image_embed` with `hd_transform_order="sub_glb"`), per image with `h x w` crops:

```
tower features [1 + h*w, side*side, D]   crop 0: the global view, then the grid row-major
  --AvgPool2d(2) (image_token_compression)--> [1 + h*w, s, s, D]        s = side / 2
sub:    grid crops stitched into [h*s, w*s, D], cut to the valid [uh, uw], + sub_GN per row
        -> [uh * (uw + 1), D]
glb:    global view [s, s, D] + sub_GN per row -> [s * (s + 1), D]
tokens: sub | glb_GN | glb -> img_projection_up -> GELU -> img_projection_down -> [n, hidden]
        n = uh * (uw + 1) + 1 + s * (s + 1)
```

`uh`, `uw` are the rows and columns of compressed features that hold image (the processor's
mask, downsampled by taking every second patch row / column).

Phi-3.5-vision lays its crops out the same way, but merges each 2x2 block by concatenation
(`merge_2x2`: the separators and the MLP input are 4 * D wide) and keeps the whole grid
(uh, uw = h*s, w*s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def num_hd_tokens(useful_rows: int, useful_cols: int, side: int) -> int:
    """Tokens of one image: its grid's valid features with a separator per row, the global
    separator, the global view with a separator per row (`side` patches per crop edge)."""
    s = side // 2
    return useful_rows * (useful_cols + 1) + 1 + s * (s + 1)


# the published checkpoints' names of the HD projection's weights -> `HDImageProjection`'s
PUBLISHED_HD_NAMES = (
    ("glb_GN", "global_img_feature_extensor"),
    ("sub_GN", "sub_img_feature_extensor"),
    ("img_projection.0.", "img_projection_up."),
    ("img_projection.2.", "img_projection_down."),
)


class HDImageProjection(nn.Module):
    """The separators and the projection MLP; parameter names as HF's (the published
    checkpoint's `glb_GN`, `sub_GN`, `img_projection.0`, `img_projection.2` map onto them)."""

    def __init__(self, vision_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.global_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, vision_dim))  # glb_GN
        self.sub_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, 1, vision_dim))  # sub_GN
        self.img_projection_up = nn.Linear(vision_dim, hidden_size)
        self.img_projection_down = nn.Linear(hidden_size, hidden_size)

    def compress(self, features: torch.Tensor, side: int) -> torch.Tensor:
        """[N, side * side, D] -> [N, s, s, D], the mean of each 2x2 patch block."""
        n, _, dim = features.shape
        grid = features.view(n, side, side, dim).permute(0, 3, 1, 2)  # [N, D, side, side]
        return F.avg_pool2d(grid, kernel_size=2, stride=2).permute(0, 2, 3, 1)

    def layout(self, crops: torch.Tensor, layout: tuple[int, int, int, int]) -> torch.Tensor:
        """One image's compressed crops [1 + h*w, s, s, D] -> its tokens [n, D] before the MLP.

        `layout` = (h, w, uh, uw): the crop grid and the valid compressed rows / columns.
        """
        h, w, uh, uw = layout
        _, s, _, dim = crops.shape
        sep = self.sub_img_feature_extensor.to(crops.dtype)  # [1, 1, 1, D]
        glb = torch.cat([crops[0], sep[0].expand(s, 1, dim)], dim=1).reshape(-1, dim)
        sub = crops[1 : 1 + h * w].reshape(h, w, s, s, dim).transpose(1, 2)  # [h, s, w, s, D]
        sub = sub.reshape(h * s, w * s, dim)[:uh, :uw]  # [uh, uw, D]
        sub = torch.cat([sub, sep[0].expand(uh, 1, dim)], dim=1).reshape(-1, dim)
        glb_sep = self.global_img_feature_extensor.to(crops.dtype)[0]  # [1, D]
        return torch.cat([sub, glb_sep, glb])

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n, D] -> [n, hidden] (HF: up, exact GELU, down)."""
        return self.img_projection_down(F.gelu(self.img_projection_up(tokens)))


def merge_2x2(features: torch.Tensor, side: int) -> torch.Tensor:
    """Phi-3-vision's compression: [N, side * side, D] -> [N, s, s, 4 * D], each 2x2 patch
    block's features concatenated (row-major within the block) instead of averaged."""
    n, _, dim = features.shape
    s = side // 2
    blocks = features.reshape(n, s, 2, s, 2, dim).permute(0, 1, 3, 2, 4, 5)  # [N, s, s, 2, 2, D]
    return blocks.reshape(n, s, s, 4 * dim)
