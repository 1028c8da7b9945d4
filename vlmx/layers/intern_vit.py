"""InternViT, the vision tower of InternVL: a ViT with a CLS token and layer scale.

Matches HF `InternVLVisionModel` (transformers 5.24) on fixed-size tiles:

```
pixel_values [B, C, S, S]            B tiles of S x S pixels (S = image_size, 448)
  -> Conv2d(p, stride p), flatten    [B, (S/p)**2, D]     patch_embeddings.projection
  -> [CLS] + patches, + pos embed    [B, 1 + (S/p)**2, D]
  -> num_hidden_layers x layer:      x = x + lambda_1 * attn(norm_before(x))
                                     x = x + lambda_2 * mlp(norm_after(x))
  -> layernorm (Identity when use_mean_pooling, as InternVL3)
```

attn: q/k/v (fused here into `qkv_proj`; bias per `attention_bias`), optional RMSNorm of q and k
over all heads (`use_qk_norm`), full attention inside each tile, `projection_layer`. The norms
are LayerNorm or RMSNorm per `norm_type`. Parameter names equal HF's below `vision_tower.`, so
a checkpoint maps by prefix only (q/k/v are stacked by `load_weights_into`):

```
embeddings.cls_token [1, 1, D]   embeddings.position_embeddings [1, 1 + (S/p)**2, D]
embeddings.patch_embeddings.projection.{weight [D, C, p, p], bias}
encoder.layer.{i}.attention.{q,k,v}_proj / projection_layer / q_norm / k_norm
encoder.layer.{i}.mlp.fc1 / fc2   encoder.layer.{i}.layernorm_before / layernorm_after
encoder.layer.{i}.lambda_1 / lambda_2 [D]   layernorm (only when not use_mean_pooling)
```

All tiles have the same size, so each layer is one batched SDPA call over `[B, heads, L, d]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmx.layers.mlp import MLP, MergedLinear
from vlmx.layers.norm import make_norm


def _pair(value) -> tuple[int, int]:
    return (value[0], value[1]) if isinstance(value, (list, tuple)) else (value, value)


class InternVisionEmbeddings(nn.Module):
    """Matches HF `InternVLVisionEmbeddings` (no mask token): [B, C, S, S] -> [B, 1 + N, D].

    Tiles are always the configured image_size, where HF adds the position embeddings as they are
    (its bicubic interpolation applies only to other sizes, which the processor never makes).
    """

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        dim = vc.hidden_size
        self.patch_size = _pair(vc.patch_size)
        self.image_size = _pair(vc.image_size)
        image_h, image_w = self.image_size
        self.num_patches = (image_h // self.patch_size[0]) * (image_w // self.patch_size[1])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(
            vc.num_channels, dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
            if vc.use_absolute_position_embeddings
            else None
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(
                f"tiles of {tuple(pixel_values.shape[-2:])} px; the vision tower takes tiles of "
                f"its image_size {self.image_size}"
            )
        proj = self.patch_embeddings.projection
        x = proj(pixel_values.to(proj.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [B, 1 + N, D]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings
        return x


class InternVisionAttention(nn.Module):
    """Matches HF `InternVLVisionAttention`: [B, L, D] -> [B, L, D], full attention per tile."""

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        dim = vc.hidden_size
        self.num_heads = vc.num_attention_heads
        self.head_dim = dim // self.num_heads
        if self.head_dim * self.num_heads != dim:
            raise ValueError(
                f"vision hidden_size {dim} is not a multiple of num_attention_heads "
                f"{self.num_heads}"
            )
        self.qkv_proj = MergedLinear(dim, [dim] * 3, bias=vc.attention_bias)
        self.projection_layer = nn.Linear(dim, dim)
        self.q_norm = make_norm("rms_norm", dim) if vc.use_qk_norm else nn.Identity()
        self.k_norm = make_norm("rms_norm", dim) if vc.use_qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv_proj(x).split(dim, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (
            t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # [B, H, L, d]
        return self.projection_layer(out.transpose(1, 2).reshape(b, n, dim))


class InternVisionLayer(nn.Module):
    """Matches HF `InternVLVisionLayer`: pre-norm block with layer scale `lambda_1/2` [D]."""

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        dim = vc.hidden_size
        self.attention = InternVisionAttention(vc)
        self.mlp = MLP(dim, vc.intermediate_size, vc.hidden_act, bias=True)
        self.layernorm_before = make_norm(vc.norm_type, dim, vc.layer_norm_eps)
        self.layernorm_after = make_norm(vc.norm_type, dim, vc.layer_norm_eps)
        self.lambda_1 = nn.Parameter(torch.ones(dim))
        self.lambda_2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class InternVisionModel(nn.Module):
    """Matches HF `InternVLVisionModel`: tiles [B, C, S, S] -> [B, 1 + (S/p)**2, D].

    `feature_layer` picks the output as HF's `vision_feature_layer` does: -1 is the last hidden
    state after `layernorm`; any other k is HF's `hidden_states[k]` (0 = the embeddings, i = the
    output of layer i, negative counts from the end), and layers past it are not run.
    """

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        self.embeddings = InternVisionEmbeddings(vc)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            InternVisionLayer(vc) for _ in range(vc.num_hidden_layers)
        )
        self.layernorm = (
            nn.Identity()
            if vc.use_mean_pooling
            else nn.LayerNorm(vc.hidden_size, vc.layer_norm_eps)
        )

    def forward(self, pixel_values: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
        layers = self.encoder.layer
        num_states = len(layers) + 1
        if not -num_states <= feature_layer < num_states:
            raise ValueError(
                f"vision_feature_layer {feature_layer} is out of range for a tower of "
                f"{len(layers)} layers"
            )
        x = self.embeddings(pixel_values)
        if feature_layer == -1:
            for layer in layers:
                x = layer(x)
            return self.layernorm(x)
        for layer in layers[: feature_layer % num_states]:
            x = layer(x)
        return x
