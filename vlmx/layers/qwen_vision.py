"""The Qwen2-VL and Qwen2.5-VL vision towers: a patch embedding, ViT blocks with 2D RoPE and a
patch merger, over the flat patches of every image of a step.

```
pixel_values [N, C*tp*p*p] + one (t, h, w) grid per image
  --PatchEmbed--> [N, D] --blocks (varlen attention inside each image, or window)--> [N, D]
  --PatchMerger (each merge_size**2 block of patches)--> [N / merge_size**2, out_hidden]
```

Qwen2.5-VL runs its blocks on the patches reordered window by window; the blocks named in
`fullatt_block_indexes` attend over whole frames, the others inside their window.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmx.device import host_to_device
from vlmx.layers.attention import VarlenSegments
from vlmx.layers.rotary import VisionRotaryEmbedding
from vlmx.layers.vision import (
    Grid,
    PatchEmbed,
    PatchMerger,
    VisionBlock,
    run_vision_blocks,
    vision_cu_seqlens,
    vision_position_ids,
    window_index,
)


def vision_rope_theta(vision_config) -> float:
    params = getattr(vision_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def patch_dim(vision_config) -> int:
    """Length of one flattened patch: C * temporal_patch_size * patch_size**2."""
    vc = vision_config
    return vc.in_channels * vc.temporal_patch_size * vc.patch_size**2


class QwenVisionTower(nn.Module):
    """What both towers share: patch embedding, 2D RoPE, `VisionBlock`s, a `PatchMerger`."""

    def __init__(
        self, vision_config, dim: int, mlp_dim: int, out_dim: int, norm: str, gated_mlp: bool
    ) -> None:
        super().__init__()
        vc = vision_config
        self.merge_size = vc.spatial_merge_size
        self.patch_embed = PatchEmbed(patch_dim(vc), dim)
        self.rotary_pos_emb = VisionRotaryEmbedding(dim // vc.num_heads, vision_rope_theta(vc))
        self.blocks = nn.ModuleList(
            VisionBlock(dim, vc.num_heads, mlp_dim, vc.hidden_act, norm=norm, gated_mlp=gated_mlp)
            for _ in range(vc.depth)
        )
        self.merger = PatchMerger(out_dim, dim, vc.spatial_merge_size, norm=norm)


class Qwen2VisionTransformer(QwenVisionTower):
    """Matches HF `Qwen2VisionTransformerPretrainedModel`.

    pixel_values [N, C*tp*p*p] + one (t, h, w) grid per image -> [N / merge_size**2, hidden]
    (the merged tokens, images one after another).
    """

    def __init__(self, vision_config) -> None:
        vc = vision_config
        super().__init__(
            vc,
            vc.embed_dim,
            int(vc.embed_dim * vc.mlp_ratio),
            vc.hidden_size,
            norm="layer_norm",
            gated_mlp=False,
        )

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        pos_hw = vision_position_ids(grids, self.merge_size)  # [N, 2] CPU
        segments = VarlenSegments(vision_cu_seqlens(grids))  # one per frame, for every block
        x = self.patch_embed(pixel_values)  # [N, embed_dim]
        cos, sin = self.rotary_pos_emb(host_to_device(pos_hw, x.device))
        x = run_vision_blocks(self.blocks, x, cos, sin, lambda i: segments)
        return self.merger(x)


class Qwen2_5_VisionTransformer(QwenVisionTower):
    """Matches HF `Qwen2_5_VisionTransformerPretrainedModel`.

    Blocks run on the patches reordered window by window (`window_index`); the merged tokens
    are put back in processor order after the merger:
    [N, C*tp*p*p] + grids -> [N / merge_size**2, out_hidden_size].
    """

    def __init__(self, vision_config) -> None:
        vc = vision_config
        super().__init__(
            vc,
            vc.hidden_size,
            vc.intermediate_size,
            vc.out_hidden_size,
            norm="rms_norm",
            gated_mlp=True,
        )
        self.window_merged = vc.window_size // vc.spatial_merge_size // vc.patch_size
        self.fullatt_block_indexes = set(vc.fullatt_block_indexes)

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        unit = self.merge_size**2
        block_idx, cu_window = window_index(grids, self.merge_size, self.window_merged)
        patch_idx = (block_idx[:, None] * unit + torch.arange(unit, device="cpu")).flatten()  # [N]
        restore = torch.empty_like(block_idx)  # [N / unit] inverse of block_idx
        restore[block_idx] = torch.arange(block_idx.numel(), device="cpu")
        pos_hw = vision_position_ids(grids, self.merge_size)[patch_idx]  # [N, 2], window order
        full, windows = VarlenSegments(vision_cu_seqlens(grids)), VarlenSegments(cu_window)

        device = pixel_values.device
        patch_idx = host_to_device(patch_idx, device)
        restore = host_to_device(restore, device)
        x = self.patch_embed(pixel_values)[patch_idx]  # [N, hidden], window order
        cos, sin = self.rotary_pos_emb(host_to_device(pos_hw, device))
        x = run_vision_blocks(
            self.blocks, x, cos, sin, lambda i: full if i in self.fullatt_block_indexes else windows
        )
        return self.merger(x)[restore]
