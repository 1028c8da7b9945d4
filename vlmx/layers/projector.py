"""The projectors between a vision tower and the decoder: `linear_1 -> act -> linear_2`, with
what a family puts in front (HF `LlavaMultiModalProjector`, `Mistral3MultiModalProjector`,
`InternVLMultiModalProjector`). Parameter names are HF's below the projector's prefix.

```
Llava:     x [N, D * L]                                       -> linear_1, act, linear_2
Mistral 3: x [N, D] -> RMSNorm -> patch merger [N / m^2, D]   -> linear_1, act, linear_2
InternVL:  x [N, 4 * D] -> LayerNorm                          -> linear_1, act, linear_2
                                                                 -> [rows, hidden]
```
"""

from __future__ import annotations

import torch
from torch import nn

from vlmx.layers.activation import get_act_fn
from vlmx.layers.norm import RMSNorm
from vlmx.layers.pixtral_vision import Grid2D


class ProjectorMLP(nn.Module):
    """`linear_2(act(linear_1(x)))`: HF `LlavaMultiModalProjector`, and the tail of the others.
    x: [N, in_dim] -> [N, hidden]"""

    def __init__(self, in_dim: int, hidden: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden, bias=bias)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)
        self.act = get_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class InternVLProjector(ProjectorMLP):
    """Matches HF `InternVLMultiModalProjector`: LayerNorm, then the MLP.
    [N, 4 * Dv] -> [N, hidden] (4 = (1 / downsample_ratio) ** 2)."""

    def __init__(self, in_dim: int, hidden: int, act: str) -> None:
        super().__init__(in_dim, hidden, act)
        self.layer_norm = nn.LayerNorm(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.layer_norm(x))


class Mistral3PatchMerger(nn.Module):
    """Matches HF `Mistral3PatchMerger`: per image, each `m x m` block of its patch grid is
    concatenated in `F.unfold`'s order (channel-major: feature `c * m * m + i * m + j` holds
    channel c of the block's patch (i, j)), blocks row-major, then `merging_layer`.
    [N, D] + grids -> [N / m^2, D]
    """

    def __init__(self, dim: int, merge_size: int) -> None:
        super().__init__()
        self.merge_size = merge_size
        self.merging_layer = nn.Linear(dim * merge_size**2, dim, bias=False)

    def forward(self, x: torch.Tensor, grids: list[Grid2D]) -> torch.Tensor:
        m, d = self.merge_size, x.shape[-1]
        blocks = []
        for image, (rows, cols) in zip(x.split([r * c for r, c in grids]), grids, strict=True):
            grid = image.view(rows // m, m, cols // m, m, d).permute(0, 2, 4, 1, 3)
            blocks.append(grid.reshape(-1, d * m * m))  # [rows * cols / m^2, D * m^2]
        return self.merging_layer(torch.cat(blocks))


class Mistral3Projector(ProjectorMLP):
    """Matches HF `Mistral3MultiModalProjector`: norm -> patch merger -> the MLP."""

    def __init__(
        self, dim: int, hidden: int, act: str, bias: bool, merge_size: int, eps: float
    ) -> None:
        super().__init__(dim, hidden, act, bias)
        self.norm = RMSNorm(dim, eps)
        self.patch_merger = Mistral3PatchMerger(dim, merge_size)

    def forward(self, x: torch.Tensor, grids: list[Grid2D]) -> torch.Tensor:
        return super().forward(self.patch_merger(self.norm(x), grids))
