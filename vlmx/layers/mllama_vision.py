"""The Mllama (Llama 3.2 Vision) vision tower: tiles with aspect-ratio embeddings, a local and a
gated global transformer, intermediate layers concatenated.

Matches HF `MllamaVisionModel` (transformers 5.24), per image of `T = max_num_tiles` tiles:

```
pixel_values [B, T, 3, S, S] -> conv patch embed           [B, T, g*g, D]       g = S / patch
  + tanh(gate) * pre_tile_embedding[aspect_ratio_id]       (one vector per tile)
  -> CLS first                                             [B, T, P, D]         P = g*g + 1
  + (1 - tanh(gate)) * pos + tanh(gate) * tile_pos[aspect_ratio_id]
  -> layernorm_pre -> pad each tile to P' (a multiple of 8) [B, T * P', D]
  -> transformer (keeps the outputs of intermediate_layers_indices) -> layernorm_post
  + tanh(gate) * post_tile_embedding -> global transformer (gated layers)
  -> drop the padding, concat [final | intermediates]      [B, T, P, D * (1 + K)]
```
Attention inside the tower masks only (padding query, padding key) pairs, as HF's
`_prepare_aspect_ratio_attention_mask` does: a padding token is a patch past P or a tile past
the image's tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmx.layers.mlp import MLP


class MllamaVisionAttention(nn.Module):
    """HF `MllamaVisionAttention`: no biases, x [B, N, D] with a bool mask [B, 1, N, N]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )  # [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MllamaVisionLayer(nn.Module):
    """HF `MllamaVisionEncoderLayer`; `gated`: tanh(gate_attn / gate_ffn) scale each branch."""

    def __init__(self, cfg, gated: bool) -> None:
        super().__init__()
        self.self_attn = MllamaVisionAttention(cfg.hidden_size, cfg.attention_heads)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, cfg, num_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionLayer(cfg, gated) for _ in range(num_layers))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, keep: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, N, D] -> (the last layer's output, the outputs of layers `keep`)."""
        wanted = [i % len(self.layers) for i in keep]
        kept: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i in wanted:
                kept[i] = x
        return x, [kept[i] for i in wanted]


class AspectRatioEmbedding(nn.Module):
    """HF `MllamaPrecomputedAspectRatioEmbedding` (gated): one vector per tile per aspect ratio."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_num_tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * self.dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, N, D] + tanh(gate) * embedding, [B, T, 1, D]."""
        emb = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.dim)
        return x + emb * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """HF `MllamaPrecomputedPositionEmbedding`: a gated mix of one patch position table and a
    per-aspect-ratio table of every tile's patches."""

    def __init__(self, cfg, num_patches: int) -> None:
        super().__init__()
        self.max_num_tiles, self.num_patches, self.dim = (
            cfg.max_num_tiles,
            num_patches,
            cfg.hidden_size,
        )
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(num_patches, cfg.hidden_size))
        self.tile_embedding = nn.Embedding(
            cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * num_patches * cfg.hidden_size
        )

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, P, D] -> the same, positions added."""
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.num_patches, self.dim)
        tile = self.tile_embedding(aspect_ratio_ids)
        tile = tile.reshape(x.shape[0], self.max_num_tiles, self.num_patches, self.dim)
        return x + gate * tile


class MllamaVisionModel(nn.Module):
    """See the module docstring. Parameter names follow HF's `vision_model.*`."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_num_tiles = cfg.max_num_tiles
        self.grid = cfg.image_size // cfg.patch_size
        self.num_patches = self.grid**2 + 1  # P: the patches and CLS of a tile
        self.num_padding = (8 - self.num_patches % 8) % 8
        if self.num_padding == 0:
            # NOTE: HF's mask builder then masks every token (`[-0:]` selects all); not matched.
            raise ValueError(
                f"a vision tower with (image_size / patch_size)**2 + 1 = {self.num_patches} "
                "tokens per tile (a multiple of 8) is not supported"
            )
        self.intermediate_layers_indices = tuple(cfg.intermediate_layers_indices)
        self.output_dim = cfg.hidden_size * (1 + len(self.intermediate_layers_indices))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.gated_positional_embedding = GatedPositionEmbedding(cfg, self.num_patches)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size)
        self.transformer = MllamaVisionEncoder(cfg, cfg.num_hidden_layers, gated=False)
        self.global_transformer = MllamaVisionEncoder(cfg, cfg.num_global_layers, gated=True)

    def attention_mask(self, num_tiles: torch.Tensor, max_tiles: int) -> torch.Tensor:
        """[B, 1, N, N] bool (True = attend), N = max_tiles * P': every pair but padding-padding.

        num_tiles: [B] int64, the image's real tiles."""
        padded = self.num_patches + self.num_padding
        device = num_tiles.device
        tile_idx = torch.arange(max_tiles, device=device)
        is_pad_tile = tile_idx[None, :] >= num_tiles[:, None]  # [B, T]
        is_pad_patch = torch.arange(padded, device=device) >= self.num_patches  # [P']
        is_pad = (is_pad_tile[:, :, None] | is_pad_patch[None, None, :]).flatten(1)  # [B, N]
        return ~(is_pad[:, :, None] & is_pad[:, None, :]).unsqueeze(1)

    def forward(
        self,
        pixel_values: torch.Tensor,  # [B, T, 3, S, S]
        aspect_ratio_ids: torch.Tensor,  # [B] int64
        num_tiles: torch.Tensor,  # [B] int64
    ) -> torch.Tensor:
        """-> [B, T, P, output_dim]."""
        b, t = pixel_values.shape[:2]
        dim, p, padded = self.cfg.hidden_size, self.num_patches, self.num_patches + self.num_padding
        x = self.patch_embedding(pixel_values.flatten(0, 1).to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2).reshape(b, t, -1, dim)  # [B, T, g*g, D]
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        cls = self.class_embedding.expand(b, t, 1, dim)
        x = torch.cat([cls, x], dim=2)  # [B, T, P, D]
        x = self.layernorm_pre(self.gated_positional_embedding(x, aspect_ratio_ids))
        x = F.pad(x, (0, 0, 0, self.num_padding))  # [B, T, P', D]
        mask = self.attention_mask(num_tiles, t)
        x, kept = self.transformer(
            x.reshape(b, t * padded, dim), mask, self.intermediate_layers_indices
        )
        x = self.layernorm_post(x).reshape(b, t, padded, dim)
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids)
        x, _ = self.global_transformer(x.reshape(b, t * padded, dim), mask)
        x = x.reshape(b, t, padded, dim)[:, :, :p]
        # NOTE: HF stacks the intermediates on a last axis, so features interleave (d, k).
        inter = torch.stack(kept, dim=-1).reshape(b, t, padded, -1)[:, :, :p]
        return torch.cat([x, inter], dim=-1)  # [B, T, P, D * (1 + K)]
