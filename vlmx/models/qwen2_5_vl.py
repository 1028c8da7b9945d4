"""Qwen2.5-VL: Qwen2-VL's decoder with a windowed-attention vision tower.

HF reference: `transformers.Qwen2_5_VLForConditionalGeneration` (transformers 5). The decoder,
the interface methods and the weight-name mapping are Qwen2-VL's; only the tower differs.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmx.device import host_to_device
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
from vlmx.models.qwen2_vl import Qwen2VLForConditionalGeneration, patch_dim, vision_rope_theta
from vlmx.models.qwen2_vl_processor import Qwen2VLProcessor  # noqa: F401


class Qwen2_5_VisionTransformer(nn.Module):
    """Matches HF `Qwen2_5_VisionTransformerPretrainedModel`.

    Blocks run on the patches reordered window by window (`window_index`); blocks listed in
    `fullatt_block_indexes` attend over whole frames, the others inside their window. The merged
    tokens are put back in processor order after the merger:
    [N, C*tp*p*p] + grids -> [N / merge_size**2, out_hidden_size].
    """

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        self.merge_size = vc.spatial_merge_size
        self.window_merged = vc.window_size // vc.spatial_merge_size // vc.patch_size
        self.fullatt_block_indexes = set(vc.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(patch_dim(vc), vc.hidden_size)
        self.rotary_pos_emb = VisionRotaryEmbedding(
            vc.hidden_size // vc.num_heads, vision_rope_theta(vc)
        )
        self.blocks = nn.ModuleList(
            VisionBlock(
                vc.hidden_size,
                vc.num_heads,
                vc.intermediate_size,
                vc.hidden_act,
                norm="rms_norm",
                gated_mlp=True,
            )
            for _ in range(vc.depth)
        )
        self.merger = PatchMerger(
            vc.out_hidden_size, vc.hidden_size, vc.spatial_merge_size, norm="rms_norm"
        )

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        unit = self.merge_size**2
        block_idx, cu_window = window_index(grids, self.merge_size, self.window_merged)
        patch_idx = (block_idx[:, None] * unit + torch.arange(unit, device="cpu")).flatten()  # [N]
        restore = torch.empty_like(block_idx)  # [N / unit] inverse of block_idx
        restore[block_idx] = torch.arange(block_idx.numel(), device="cpu")
        pos_hw = vision_position_ids(grids, self.merge_size)[patch_idx]  # [N, 2], window order
        cu_full = vision_cu_seqlens(grids)

        device = pixel_values.device
        patch_idx = host_to_device(patch_idx, device)
        restore = host_to_device(restore, device)
        x = self.patch_embed(pixel_values)[patch_idx]  # [N, hidden], window order
        cos, sin = self.rotary_pos_emb(host_to_device(pos_hw, device))
        x = run_vision_blocks(
            self.blocks,
            x,
            cos,
            sin,
            lambda i: cu_full if i in self.fullatt_block_indexes else cu_window,
        )
        return self.merger(x)[restore]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """The vlmx model interface for Qwen2.5-VL; see `Qwen2VLForConditionalGeneration`."""

    def build_visual(self, vision_config) -> nn.Module:
        return Qwen2_5_VisionTransformer(vision_config)
