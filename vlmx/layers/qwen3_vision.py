"""The Qwen3-VL vision tower: Qwen2-VL's patch embedding, 2D RoPE and ViT blocks, plus learned
position embeddings resampled to each image's grid and DeepStack mergers on inner blocks.

```
pixel_values [N, C*tp*p*p] + one (t, h, w) grid per image
  --PatchEmbed (bias) + pos_embed (side x side table, bilinear to h x w)--> [N, D]
  --blocks (LayerNorm, GELU-tanh MLP, attention inside each frame)--> [N, D]
      after block deepstack_visual_indexes[j]: deepstack_merger_list[j] --> [N / m**2, out]
  --merger--> [N / m**2, out]
output: [N / m**2, out * (1 + num_deepstack)] = merger | deepstack 0 | deepstack 1 | ...
```

The DeepStack parts ride along the main embeddings as extra columns, so that the encoder cache
and the merge into the step's rows keep one tensor per image (`layers.deepstack`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmx.device import host_to_device
from vlmx.layers.attention import VarlenSegments
from vlmx.layers.qwen_vision import patch_dim, vision_rope_theta
from vlmx.layers.rotary import VisionRotaryEmbedding
from vlmx.layers.vision import (
    Grid,
    PatchEmbed,
    VisionBlock,
    run_vision_blocks,
    vision_cu_seqlens,
    vision_position_ids,
)


class Qwen3VisionMerger(nn.Module):
    """Matches HF `Qwen3VLVisionPatchMerger`: LayerNorm (over each patch, or with
    `postshuffle_norm` over each concatenated block of merge**2 patches), then
    `linear_fc2(GELU(linear_fc1(.)))`: [N, dim] -> [N / merge**2, out_dim]."""

    def __init__(self, dim: int, out_dim: int, merge_size: int, postshuffle_norm: bool) -> None:
        super().__init__()
        self.hidden_size = dim * merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.hidden_size if postshuffle_norm else dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.hidden_size, self.hidden_size)
        self.linear_fc2 = nn.Linear(self.hidden_size, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, self.hidden_size))
        else:
            x = self.norm(x).view(-1, self.hidden_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def interpolated_pos_embed(table: torch.Tensor, grids: list[Grid], merge_size: int) -> torch.Tensor:
    """The learned `[side * side, D]` position table resampled to each grid, in processor order.

    Matches HF `get_vision_interpolation_indices_and_weights(mode="bilinear",
    align_corners=True)` and the weighted gather after it: bilinear in float32, corners on
    corners, the rows of a frame in merge-block order, repeated over the frames. [N, D] float32.
    """
    side = int(table.shape[0] ** 0.5)
    dim = table.shape[1]
    grid = table.float().t().reshape(1, dim, side, side)
    out, cache = [], {}
    for t, h, w in grids:
        if (h, w) not in cache:
            x = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[0]
            x = x.permute(1, 2, 0)  # [h, w, D]
            x = x.reshape(h // merge_size, merge_size, w // merge_size, merge_size, dim)
            cache[(h, w)] = x.permute(0, 2, 1, 3, 4).reshape(h * w, dim)
        out.append(cache[(h, w)].repeat(t, 1))
    return torch.cat(out)


class Qwen3VisionTransformer(nn.Module):
    """Matches HF `Qwen3VLVisionModel`: pixel_values [N, C*tp*p*p] + grids ->
    [N / merge**2, out_hidden_size * (1 + len(deepstack_visual_indexes))] (see the module
    docstring for the column layout)."""

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        dim = vc.hidden_size
        self.merge_size = vc.spatial_merge_size
        self.deepstack_visual_indexes = [int(i) for i in vc.deepstack_visual_indexes]
        indexes = self.deepstack_visual_indexes
        if any(not 0 <= i < vc.depth for i in indexes) or len(set(indexes)) != len(indexes):
            raise ValueError(
                f"vision_config.deepstack_visual_indexes {self.deepstack_visual_indexes} must be "
                f"distinct block indexes below depth={vc.depth}"
            )
        side = int(vc.num_position_embeddings**0.5)
        if side * side != vc.num_position_embeddings:
            raise ValueError(
                f"vision_config.num_position_embeddings={vc.num_position_embeddings} must be a "
                "square (a side x side grid of learned positions)"
            )
        self.patch_embed = PatchEmbed(patch_dim(vc), dim, bias=True)
        self.pos_embed = nn.Embedding(vc.num_position_embeddings, dim)
        self.rotary_pos_emb = VisionRotaryEmbedding(dim // vc.num_heads, vision_rope_theta(vc))
        self.blocks = nn.ModuleList(
            VisionBlock(dim, vc.num_heads, vc.intermediate_size, vc.hidden_act)
            for _ in range(vc.depth)
        )
        out = vc.out_hidden_size
        self.merger = Qwen3VisionMerger(dim, out, self.merge_size, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3VisionMerger(dim, out, self.merge_size, postshuffle_norm=True)
            for _ in self.deepstack_visual_indexes
        )

    @property
    def num_deepstack(self) -> int:
        return len(self.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        pos_hw = vision_position_ids(grids, self.merge_size)  # [N, 2] CPU
        segments = VarlenSegments(vision_cu_seqlens(grids))  # one per frame, for every block
        x = self.patch_embed(pixel_values)  # [N, D]
        pos = interpolated_pos_embed(self.pos_embed.weight, grids, self.merge_size)  # [N, D]
        x = x + pos.to(x.dtype)
        cos, sin = self.rotary_pos_emb(host_to_device(pos_hw, x.device))
        deepstack: dict[int, torch.Tensor] = {}  # block index -> [N / m**2, out]
        start = 0
        for layer in sorted(self.deepstack_visual_indexes):
            x = run_vision_blocks(self.blocks[start : layer + 1], x, cos, sin, lambda i: segments)
            merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(layer)]
            deepstack[layer] = merger(x)
            start = layer + 1
        x = run_vision_blocks(self.blocks[start:], x, cos, sin, lambda i: segments)
        # NOTE: HF lists the DeepStack features in block order, and decoder layer i adds the i-th.
        return torch.cat([self.merger(x), *(deepstack[i] for i in sorted(deepstack))], dim=-1)
