"""A projector of learned queries that cross-attend to a vision tower's patches (Aria's).

Matches HF `AriaProjector` / `AriaCrossAttention` / `AriaProjectorMLP` (transformers 5):

```
queries  = query[:num_queries]            [Q, D]  (num_queries by the image's patch count)
kv       [N_i, D]  the tower's valid patches of one image
q = in_q(q_proj(LN(queries))),  k = in_k(k_proj(LN_kv(kv))),  v = in_v(v_proj(LN_kv(kv)))
a = out_proj(MHA(q, k, v)) -> linear     [Q, D]   (nn.MultiheadAttention, heads of the tower)
out = linear_out(gelu_tanh(linear_in(LN(a))))       [Q, hidden]
```

HF runs it on the whole padded canvas with the padded patches masked out of the attention;
attending over the valid patches only is the same softmax. Parameter names are HF's
(`cross_attn.multihead_attn.in_proj_weight` [3D, D], ...), so a checkpoint maps by prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QueryMultiheadAttention(nn.Module):
    """The parameters of `nn.MultiheadAttention` (batch_first, bias), applied over segments."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))  # [3D, D]
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)


class QueryCrossAttention(nn.Module):
    """HF `AriaCrossAttention`: queries [B, Q, D] over patches [N, D] in B segments."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.multihead_attn = QueryMultiheadAttention(dim, num_heads)
        self.linear = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_kv = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor, cu_seqlens: list[int]):
        """queries [Q, D] (shared by every image), patches [N, D] (image i's are
        cu_seqlens[i]:cu_seqlens[i + 1]) -> [B, Q, D]."""
        mha = self.multihead_attn
        dim = queries.shape[-1]
        heads, head_dim = mha.num_heads, dim // mha.num_heads
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        q = F.linear(self.q_proj(self.layer_norm(queries)), w_q, b_q)  # [Q, D]
        kv = self.layer_norm_kv(patches)
        k = F.linear(self.k_proj(kv), w_k, b_k)  # [N, D]
        v = F.linear(self.v_proj(kv), w_v, b_v)
        num_images, num_queries = len(cu_seqlens) - 1, q.shape[0]
        q = q.view(1, num_queries, heads, head_dim).transpose(1, 2)  # [1, h, Q, d]
        out = q.new_empty(num_images, heads, num_queries, head_dim)
        by_len: dict[int, list[int]] = {}  # images with as many valid patches go together
        for i, (s, e) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
            by_len.setdefault(e - s, []).append(i)
        for length, idxs in by_len.items():
            rows = torch.cat([torch.arange(cu_seqlens[i], cu_seqlens[i] + length) for i in idxs])
            rows = rows.to(patches.device)
            shape = (len(idxs), length, heads, head_dim)
            k_i = k[rows].view(shape).transpose(1, 2)  # [g, h, N, d]
            v_i = v[rows].view(shape).transpose(1, 2)
            q_i = q.expand(len(idxs), -1, -1, -1)
            out[idxs] = F.scaled_dot_product_attention(q_i, k_i, v_i)  # [g, h, Q, d]
        out = out.transpose(1, 2).reshape(num_images, num_queries, dim)
        out = mha.out_proj(out)
        return self.linear(out)


class QueryProjector(nn.Module):
    """HF `AriaProjector`: per image, its valid patches [N_i, D_v] -> [Q, hidden]."""

    def __init__(
        self, vision_dim: int, num_heads: int, text_dim: int, patch_to_query: dict[int, int]
    ) -> None:
        super().__init__()
        self.patch_to_query = dict(patch_to_query)
        self.query = nn.Parameter(torch.empty(max(self.patch_to_query.values()), vision_dim))
        self.cross_attn = QueryCrossAttention(vision_dim, num_heads)
        self.layer_norm = nn.LayerNorm(vision_dim)
        self.feed_forward = nn.Module()
        self.feed_forward.linear_in = nn.Linear(vision_dim, text_dim, bias=False)
        self.feed_forward.linear_out = nn.Linear(text_dim, text_dim, bias=False)

    def num_queries(self, canvas_patches: int) -> int:
        """Queries (= image tokens) of a canvas of `canvas_patches` patches (valid or not)."""
        if canvas_patches not in self.patch_to_query:
            raise ValueError(
                f"an image of {canvas_patches} patches has no entry in the model's "
                f"projector_patch_to_query_dict {sorted(self.patch_to_query)}"
            )
        return self.patch_to_query[canvas_patches]

    def forward(
        self, patches: torch.Tensor, cu_seqlens: list[int], canvas_patches: int
    ) -> torch.Tensor:
        """patches [N, D_v] of B images of one canvas size -> [B, Q, hidden]."""
        queries = self.query[: self.num_queries(canvas_patches)]
        a = self.cross_attn(queries, patches, cu_seqlens)  # [B, Q, D_v]
        ff = self.feed_forward
        h = F.gelu(ff.linear_in(self.layer_norm(a)), approximate="tanh")
        return ff.linear_out(h)
