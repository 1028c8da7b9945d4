"""Qwen2-VL: a ViT with 2D RoPE and a 2x2 patch merger in front of a Qwen2 decoder with M-RoPE.

HF reference: `transformers.Qwen2VLForConditionalGeneration` (transformers 5).

Weight names accepted (both map onto this module's `visual.*`, `language_model.*`, `lm_head.*`):

```
transformers 5:  model.visual.*   model.language_model.{embed_tokens,layers,norm}.*   lm_head.*
hub checkpoints: visual.*         model.{embed_tokens,layers,norm}.*                  lm_head.*
```
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from vlmx.device import host_to_device
from vlmx.layers.decoder import DecoderConfig, DecoderModel
from vlmx.layers.rotary import VisionRotaryEmbedding
from vlmx.layers.vision import (
    Grid,
    PatchEmbed,
    PatchMerger,
    VisionBlock,
    run_vision_blocks,
    vision_cu_seqlens,
    vision_position_ids,
)
from vlmx.models.base import VLMBase
from vlmx.models.loader import text_config
from vlmx.models.qwen2_vl_processor import Qwen2VLProcessor  # noqa: F401
from vlmx.multimodal.inputs import MMFeature, PlaceholderRange

# HF `Qwen2VLRotaryEmbedding` falls back to this when the config names no section.
DEFAULT_MROPE_SECTION = [16, 24, 24]

# checkpoint prefix -> module prefix, first match wins
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("visual.", "visual."),
    ("model.", "language_model."),
    ("lm_head.", "lm_head."),
)


def vision_rope_theta(vision_config) -> float:
    params = getattr(vision_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def patch_dim(vision_config) -> int:
    """Length of one flattened patch: C * temporal_patch_size * patch_size**2."""
    vc = vision_config
    return vc.in_channels * vc.temporal_patch_size * vc.patch_size**2


class Qwen2VisionTransformer(nn.Module):
    """Matches HF `Qwen2VisionTransformerPretrainedModel`.

    pixel_values [N, C*tp*p*p] + one (t, h, w) grid per image -> [N / merge_size**2, hidden]
    (the merged tokens, images one after another).
    """

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        self.merge_size = vc.spatial_merge_size
        self.patch_embed = PatchEmbed(patch_dim(vc), vc.embed_dim)
        self.rotary_pos_emb = VisionRotaryEmbedding(
            vc.embed_dim // vc.num_heads, vision_rope_theta(vc)
        )
        self.blocks = nn.ModuleList(
            VisionBlock(
                vc.embed_dim,
                vc.num_heads,
                int(vc.embed_dim * vc.mlp_ratio),
                vc.hidden_act,
                norm="layer_norm",
                gated_mlp=False,
            )
            for _ in range(vc.depth)
        )
        self.merger = PatchMerger(vc.hidden_size, vc.embed_dim, vc.spatial_merge_size)

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        pos_hw = vision_position_ids(grids, self.merge_size)  # [N, 2] CPU
        cu_seqlens = vision_cu_seqlens(grids)
        x = self.patch_embed(pixel_values)  # [N, embed_dim]
        cos, sin = self.rotary_pos_emb(host_to_device(pos_hw, x.device))
        x = run_vision_blocks(self.blocks, x, cos, sin, lambda i: cu_seqlens)
        return self.merger(x)


class Qwen2VLForConditionalGeneration(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for Qwen2-VL.

    `encode_images` reads per image `data["pixel_values"]` ([t*h*w, C*tp*p*p], processor order)
    and `data["image_grid_thw"]` ([3] int64, best on the CPU: it is read on the host).
    `forward` takes positions [3, T] int64 (M-RoPE rows t, h, w).
    """

    uses_mrope = True
    chunk_images = True  # causal attention over image tokens: a chunk may end inside one
    weight_prefixes = _PREFIXES

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.config = DecoderConfig.from_hf(
            text_config(hf_config),
            qkv_bias=True,
            o_bias=False,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            default_mrope_section=DEFAULT_MROPE_SECTION,
        )
        self.merge_size = hf_config.vision_config.spatial_merge_size
        self.visual = self.build_visual(hf_config.vision_config)
        self.language_model = DecoderModel(self.config)
        self.lm_head = self.build_lm_head(self.config.tie_word_embeddings)

    def build_visual(self, vision_config) -> nn.Module:
        return Qwen2VisionTransformer(vision_config)

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Random square images worth `num_embeds` embeddings in all, for memory profiling."""
        side = 64  # patches per side: 1024 embeddings per image after the 2x2 merge
        per_image = side * side // self.merge_size**2
        dim = self.visual.patch_embed.proj.in_features
        weight = self.language_model.embed_tokens.weight
        features = []
        for i in range(max(1, num_embeds // per_image)):
            pixels = torch.randn(side * side, dim, device=weight.device, dtype=weight.dtype)
            features.append(
                MMFeature(
                    mm_hash=f"profile-{i}",
                    placeholder=PlaceholderRange(0, per_image),
                    data={"pixel_values": pixels, "image_grid_thw": torch.tensor([1, side, side])},
                )
            )
        return features

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All images through the vision tower in one call; one [num_embeds_i, hidden] each."""
        if not features:
            return []
        grid_rows = torch.stack([f.data["image_grid_thw"].reshape(3) for f in features])
        grids: list[Grid] = [(t, h, w) for t, h, w in grid_rows.tolist()]
        weight = self.language_model.embed_tokens.weight
        pixel_values = torch.cat([f.data["pixel_values"] for f in features])
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        num_patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != num_patches:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} patches but image_grid_thw "
                f"{grids} describe {num_patches}"
            )
        sizes = [t * h * w // self.merge_size**2 for t, h, w in grids]
        for feature, size in zip(features, sizes):
            if feature.num_embeds != size:
                raise ValueError(
                    f"image {feature.mm_hash!r} has {feature.num_embeds} placeholder tokens but "
                    f"its grid yields {size} embeddings"
                )
        embeds = self.visual(pixel_values, grids)  # [sum(sizes), hidden]
        return list(embeds.split(sizes))
