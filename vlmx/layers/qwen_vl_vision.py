"""Qwen-VL's vision tower: ViT-bigG/14 and a 256-query cross-attention resampler.

Module and parameter names are the published checkpoint's below `transformer.visual.`:

```
pixel_values [B, 3, S, S]
  -> conv1 (patch x patch, stride patch, no bias)           [B, W, g, g] -> [B, g*g, W]
  -> + positional_embedding (16 x 16 rows, bicubic to g x g) -> ln_pre
  -> resblocks: x + attn(ln_1(x)); x + mlp(ln_2(x))          [B, g*g, W]
     attn.in_proj: per head [q | k | v] (the head-major layout of the published weights)
     mlp: c_fc -> GELU (erf) -> c_proj
  -> attn_pool: kv = ln_kv(kv_proj(x)); q = ln_q(query) + pos_embed;
     MultiheadAttention(q, kv + pos_embed (bicubic to g x g), kv)  [B, n_queries, D]
  -> ln_post -> @ proj                                       [B, n_queries, D]
```

All LayerNorms have eps 1e-6. `pos_embed` is the 2D sin-cos table the checkpoint stores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


def resize_positions(table: torch.Tensor, num_positions: int) -> torch.Tensor:
    """[n*n, C] square table -> [m*m, C] (m*m = num_positions), bicubic, align_corners False,
    as the published `get_abs_pos` (computed in float32)."""
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(num_positions)
    assert src * src == table.shape[0] and tgt * tgt == num_positions
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1, C, n, n]
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(num_positions, -1).to(table.dtype)


class VisualAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, W]
        b, n, w = x.shape
        qkv = self.in_proj(x).view(b, n, self.heads, 3 * (w // self.heads))
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # [B, heads, L, head_dim] each
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class VisualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=_EPS)
        self.ln_2 = nn.LayerNorm(width, eps=_EPS)
        self.attn = VisualAttention(width, heads)
        self.mlp = VisualMLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualStack(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    """`n_queries` learned queries cross-attend to the tower's patches (one head per 128)."""

    def __init__(self, n_queries: int, dim: int, kv_dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(n_queries, dim))  # 2D sin-cos, loaded
        self.query = nn.Parameter(torch.empty(n_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, max(1, dim // 128), batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, kv_dim]
        kv = self.ln_kv(self.kv_proj(x))  # [B, L, D]
        key_pos = resize_positions(self.pos_embed, x.shape[1])  # [L, D]
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)  # [B, Q, D]
        return self.attn(q, kv + key_pos, kv, need_weights=False)[0]  # [B, Q, D]


class QwenVLVisionTower(nn.Module):
    """HF-remote `VisionTransformer` of Qwen-VL: [B, 3, S, S] -> [B, n_queries, output_dim]."""

    def __init__(self, visual: dict) -> None:
        super().__init__()
        width, patch = visual["width"], visual["patch_size"]
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(256, width))
        self.ln_pre = nn.LayerNorm(width, eps=_EPS)
        self.transformer = VisualStack(
            width, visual["layers"], visual["heads"], visual["mlp_ratio"]
        )
        dim = visual["output_dim"]
        self.attn_pool = Resampler(visual["n_queries"], dim, width)
        self.ln_post = nn.LayerNorm(dim, eps=_EPS)
        self.proj = nn.Parameter(torch.empty(dim, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values).flatten(2).transpose(1, 2)  # [B, g*g, W]
        x = x + resize_positions(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))  # [B, g*g, W]
        return self.ln_post(self.attn_pool(x)) @ self.proj  # [B, n_queries, D]
