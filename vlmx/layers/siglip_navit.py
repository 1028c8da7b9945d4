"""SigLIP-NaViT: a SigLIP tower over fixed-size crops whose padded patches are masked out.

Matches HF `Phi4MultimodalVisionModel` (transformers 5; the published Phi-4-multimodal's
`vision_siglip_navit`), read at `hidden_states[feature_layer]` as `Phi4MultimodalImageEmbedding`
reads it (before `post_layernorm`; its pooling head is never used):

```
crops [N, 3, S, S], patch_mask [N, S/p, S/p] bool (False = padding)
  --patchify, patch_embedding (Conv2d as a matmul)--> [N, L, D] + position_embedding[pos_ids]
      pos_ids: each valid patch's fractional (row, col) in its crop's valid area, bucketed
               into the side x side grid of learned positions (`navit_position_ids`); 0 on padding
  --the first num_hidden_layers + 1 + feature_layer encoder layers, keys of padded patches
    masked out (every query, padded ones too, as HF computes them)--> [N, L, D]
```

Parameter names equal HF's below the tower's prefix (`img_processor.` in both Phi-4 layouts):
`embeddings.{patch_embedding,position_embedding}`, `encoder.layers.{i}.{layer_norm1,
self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}` (q/k/v fused into `qkv_proj` by
`load_weights_into`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmx.layers.mlp import MLP, MergedLinear
from vlmx.layers.siglip import SiglipEmbeddings, patchify


def navit_position_ids(patch_mask: torch.Tensor, side: int) -> torch.Tensor:
    """patch_mask [N, R, C] bool -> position ids [N, R * C] int64 (0 at padded patches).

    Matches HF `Phi4MultimodalVisionEmbeddings.forward` (and Idefics3's): the float32 fractional
    coordinates `i / valid_rows`, clamped below 1, bucketed into `side` buckets.
    """
    n, rows, cols = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device, dtype=torch.float32)
    step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)  # [N] float32
    step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)
    coords_h = torch.arange(rows, device=device, dtype=torch.float32)[None] * step_h[:, None]
    coords_w = torch.arange(cols, device=device, dtype=torch.float32)[None] * step_w[:, None]
    bucket_h = torch.bucketize(coords_h.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [N, R]
    bucket_w = torch.bucketize(coords_w.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [N, C]
    ids = (bucket_h[:, :, None] * side + bucket_w[:, None, :]).reshape(n, -1)  # [N, R * C]
    return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


class MaskedSiglipAttention(nn.Module):
    """HF `Phi4MultimodalVisionAttention` (q/k/v fused): [N, L, D] -> [N, L, D], bidirectional,
    keys where `key_mask` is False left out."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = MergedLinear(dim, [dim, dim, dim], bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv_proj(x).view(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, L, d]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [N, 1, 1, L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class NaViTEncoderLayer(nn.Module):
    """HF `Phi4MultimodalVisionEncoderLayer`: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        self.layer_norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.self_attn = MaskedSiglipAttention(vc.hidden_size, vc.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = MLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act, bias=True)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class NaViTEncoder(nn.Module):
    def __init__(self, vision_config, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NaViTEncoderLayer(vision_config) for _ in range(num_layers))


def layers_to_run(vision_config, feature_layer: int) -> int:
    """How many encoder layers produce `hidden_states[feature_layer]` (index 0 is the
    embeddings, so -1 is the last layer's output and -2 the one before it)."""
    total = vision_config.num_hidden_layers
    num = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
    if not 0 <= num <= total:
        raise ValueError(
            f"vision feature_layer {feature_layer} is outside the tower's {total} layers"
        )
    return num


class NaViTSiglipTower(nn.Module):
    """The tower up to `feature_layer`: crops [N, 3, S, S] + patch_mask -> [N, (S/p)**2, D].

    Only the layers that feature is read from are built; the checkpoint's later layers,
    `post_layernorm` and `head` are not parameters here (`unused_weight`).
    """

    def __init__(self, vision_config, feature_layer: int) -> None:
        super().__init__()
        self.patch_size = vision_config.patch_size
        self.side = vision_config.image_size // vision_config.patch_size
        self.num_layers = layers_to_run(vision_config, feature_layer)
        self.embeddings = SiglipEmbeddings(vision_config)
        self.encoder = NaViTEncoder(vision_config, self.num_layers)

    def unused_weight(self, name: str) -> bool:
        """Whether a checkpoint name below the tower's prefix is one this tower does not run."""
        if name.startswith(("post_layernorm.", "head.")):
            return True
        if name.startswith("encoder.layers."):
            return int(name.split(".")[2]) >= self.num_layers
        return False

    def forward(self, crops: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        n = crops.shape[0]
        patches = patchify(crops, self.patch_size)  # [N, L, 3 * p * p]
        position_ids = navit_position_ids(patch_mask, self.side)  # [N, L]
        x = self.embeddings(patches, position_ids)  # [N, L, D]
        key_mask = patch_mask.reshape(n, -1)  # [N, L] bool
        key_mask = None if bool(key_mask.all()) else key_mask
        for layer in self.encoder.layers:
            x = layer(x, key_mask)
        return x
