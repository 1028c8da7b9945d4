"""SigLIP vision tower, shared by the families that put one in front of their decoder.

Matches HF `SiglipVisionModel` without its pooling head (`vision_use_head=False`, as Gemma 3,
Idefics3 and SmolVLM use it): patch embedding (a Conv2d with kernel == stride, done here as a
matmul over flattened patches), learned position embeddings, `num_hidden_layers` pre-norm
encoder layers, `post_layernorm`.

Public API (stable; other families import it):

```python
tower = SiglipVisionTower(vision_config)   # HF SiglipVisionConfig (or Idefics3VisionConfig)
out = tower(
    patches,          # [N, C * p * p], each patch flattened in (C, p_row, p_col) order
    cu_seqlens,       # list[int] [0, n0, n0 + n1, ..., N]: one segment per image
    position_ids,     # [N] int64 on the patches' device, or None = 0..n_i-1 inside each image
    feature_layers,   # None, or HF hidden-state indices (LLaVA's vision_feature_layer)
)                     # -> [N, hidden_size] after post_layernorm, or the hidden states
                      #    [N, hidden_size * len(feature_layers)] before it
patchify(pixel_values, patch_size)  # [B, C, H, W] -> [B, (H/p) * (W/p), C * p * p], row-major
```

Patches of one image attend to each other only (full attention inside each segment). When all
segments have the same length the encoder runs one batched SDPA call; otherwise it loops over
segments (`varlen_attention`). Parameter names equal HF's below the tower's prefix
(`vision_tower.vision_model.` in hub checkpoints, `vision_tower.` as transformers 5 saves
SigLIP; q/k/v fused into `self_attn.qkv_proj` by `load_weights_into`), so a checkpoint maps by
prefix only:

```
embeddings.patch_embedding.{weight,bias}     Conv2d [D, C, p, p] -> Linear [D, C*p*p]
embeddings.position_embedding.weight         [num_positions, D]
encoder.layers.{i}.layer_norm1 / layer_norm2
encoder.layers.{i}.self_attn.{q,k,v,out}_proj
encoder.layers.{i}.mlp.fc1 / fc2
post_layernorm
```
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmx.layers.attention import VarlenSegments, varlen_attention
from vlmx.layers.mlp import MLP, MergedLinear
from vlmx.layers.vision import PatchProjection


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H // p) * (W // p), C * p * p]; patches row-major, each (C, p, p).

    The same order HF's Conv2d patch embedding followed by `flatten(2).transpose(1, 2)` yields.
    Like that stride-p Conv2d, it drops the last H % p rows and W % p columns (SigLIP-384 with
    patch 14: 27 x 27 patches of a 384 px tile).
    """
    b, c, h, w = pixel_values.shape
    p = patch_size
    pixel_values = pixel_values[:, :, : h // p * p, : w // p * p]
    x = pixel_values.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


class SiglipEmbeddings(nn.Module):
    """Matches HF `SiglipVisionEmbeddings` (no interpolation): [N, C*p*p] -> [N, D]."""

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        self.patch_embedding = PatchProjection(
            vc.num_channels * vc.patch_size**2, vc.hidden_size, bias=True
        )
        num_positions = (vc.image_size // vc.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_positions, vc.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        return x + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    """Matches HF `SiglipAttention`, with q/k/v fused: [N, D] -> [N, D]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = MergedLinear(dim, [dim, dim, dim], bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        cu_seqlens = segments.cu_seqlens
        lengths = {e - s for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])}
        if len(lengths) == 1:  # equal-size images: one batched call
            seg = lengths.pop()

            def heads(t: torch.Tensor) -> torch.Tensor:  # [N, H, d] -> [B, H, seg, d]
                return t.reshape(-1, seg, self.num_heads, self.head_dim).transpose(1, 2)

            out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=self.scale)
            out = out.transpose(1, 2).reshape(n, -1)
        else:
            out = varlen_attention(q, k, v.contiguous(), segments, scale=self.scale)
            out = out.reshape(n, -1)
        return self.out_proj(out)


class SiglipEncoderLayer(nn.Module):
    """Matches HF `SiglipEncoderLayer`: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        self.layer_norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.self_attn = SiglipAttention(vc.hidden_size, vc.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = MLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act, bias=True)

    def forward(self, x: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), segments)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, vision_config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(vision_config) for _ in range(vision_config.num_hidden_layers)
        )


class SiglipVisionTower(nn.Module):
    """Matches HF `SiglipVisionModel.vision_model` (`SiglipVisionTransformer`) without a head."""

    def __init__(self, vision_config) -> None:
        super().__init__()
        self.patch_size = vision_config.patch_size
        self.embeddings = SiglipEmbeddings(vision_config)
        self.encoder = SiglipEncoder(vision_config)
        self.post_layernorm = nn.LayerNorm(
            vision_config.hidden_size, eps=vision_config.layer_norm_eps
        )

    def forward(
        self,
        patches: torch.Tensor,  # [N, C * p * p]
        cu_seqlens: list[int],  # [0, ..., N], one segment per image
        position_ids: torch.Tensor | None = None,  # [N] int64
        feature_layers: list[int] | None = None,  # hidden-state indices; None: the output
    ) -> torch.Tensor:
        """[N, hidden_size] after post_layernorm; with `feature_layers`, the hidden states HF's
        `hidden_states[i]` names (0: the embeddings, i: after layer i, negative from the end;
        no post_layernorm), concatenated: [N, hidden_size * len(feature_layers)]."""
        if position_ids is None:
            position_ids = torch.cat(
                [torch.arange(e - s) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
            ).to(patches.device, non_blocking=True)
        x = self.embeddings(patches, position_ids)  # [N, D]
        segments = VarlenSegments(cu_seqlens)  # device tensors built once, for every layer
        if feature_layers is None:
            for layer in self.encoder.layers:
                x = layer(x, segments)
            return self.post_layernorm(x)
        wanted = self.resolve_feature_layers(feature_layers)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            x = layer(x, segments)
            states[i] = x
        return torch.cat([states[i] for i in wanted], dim=-1)

    def resolve_feature_layers(self, feature_layers: list[int]) -> list[int]:
        """HF hidden-state indices (negative from the end) -> 0..num_layers, or a ValueError."""
        num_states = len(self.encoder.layers) + 1
        for idx in feature_layers:
            if not -num_states <= idx < num_states:
                raise ValueError(
                    f"vision_feature_layer {idx} is out of range for a vision tower of "
                    f"{num_states - 1} layers"
                )
        return [idx % num_states for idx in feature_layers]
