"""Gated cross-attention from text tokens to per-request image states (Mllama / Llama 3.2 Vision).

The image states' keys and values are computed once per request (`CrossAttention.kv`) and kept
by the worker for the request's life (`vlmx.worker.cross_attention`); each step passes, for the
sequences of the step that have images, their K/V and which of their keys each query row sees
(`CrossAttentionMetadata`). Sequences without images skip the layer (HF skips cross-attention
layers when there are no image states).

```
step rows:   [a0 a1 a2 | b0 | c0 c1]      a, c have images, b has none
rows:        [0 1 2 4 5]                  the rows that cross-attend, gathered once per layer
seqs:        a: rows 0..3 of the gathered block, keys of a;  c: rows 3..5, keys of c
```

A row that sees no image (text before the first `<|image|>`) still attends, with no mask, to
every key of its request, and only its MLP branch is zeroed (`row_mask`): HF's
`_prepare_cross_attention_mask` zeroes such rows' additive mask and multiplies only the MLP
output by `full_text_row_masked_out_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmx.layers.mlp import GatedMLP
from vlmx.layers.norm import RMSNorm


@dataclass(slots=True)
class CrossSequence:
    """One sequence of the step that cross-attends."""

    start: int  # its rows in the gathered block: start .. end - 1
    end: int
    kv: torch.Tensor  # [num_cross_layers, 2, num_keys, num_kv_heads, head_dim]
    mask: torch.Tensor | None  # [end - start or 1, num_keys] bool (True = attend); None: all
    num_keys: int  # the rows attend over kv's first num_keys keys


@dataclass(slots=True)
class CrossAttentionMetadata:
    """The cross-attention part of one step (built by the worker; None when no sequence of the
    step has images)."""

    rows: torch.Tensor  # [R] int64, the step rows of the sequences that have images
    row_mask: torch.Tensor  # [R, 1] float, 0 = the row sees no image (MLP branch zeroed)
    seqs: list[CrossSequence]


class CrossAttention(nn.Module):
    """HF `MllamaTextCrossAttention`: q from the text, k / v from the image states, per-head
    RMSNorm on q and k, no biases."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden // num_heads
        self.q_proj = nn.Linear(hidden, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def kv(self, states: torch.Tensor) -> torch.Tensor:
        """Image states [N, hidden] -> [2, N, num_kv_heads, head_dim] (normed keys, values)."""
        n = states.shape[0]
        k = self.k_norm(self.k_proj(states).view(n, self.num_kv_heads, self.head_dim))
        v = self.v_proj(states).view(n, self.num_kv_heads, self.head_dim)
        return torch.stack([k, v])

    def forward(self, x: torch.Tensor, seqs: list[CrossSequence], layer_idx: int) -> torch.Tensor:
        """x [R, hidden] (the gathered rows) -> [R, hidden]."""
        r = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(r, self.num_heads, self.head_dim))
        out = torch.empty_like(q)
        for seq in seqs:
            k, v = seq.kv[layer_idx, :, : seq.num_keys]  # [N, kv_heads, head_dim] each
            o = F.scaled_dot_product_attention(
                q[seq.start : seq.end].transpose(0, 1),  # [heads, n, head_dim]
                k.transpose(0, 1),
                v.transpose(0, 1),
                attn_mask=seq.mask,
                enable_gqa=True,
            )
            out[seq.start : seq.end] = o.transpose(0, 1)
        return self.o_proj(out.reshape(r, -1))


class CrossAttentionDecoderLayer(nn.Module):
    """HF `MllamaCrossAttentionDecoderLayer`: tanh-gated cross-attention and MLP branches.

    `layer_idx` is the layer's index among the cross-attention layers (its slot in each
    sequence's K/V)."""

    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.cross_attn = CrossAttention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, cross: CrossAttentionMetadata | None) -> torch.Tensor:
        """x [T, hidden] (the whole step) -> the same; rows without images unchanged."""
        if cross is None:
            return x
        h = x.index_select(0, cross.rows)  # [R, hidden]
        attn = self.cross_attn(self.input_layernorm(h), cross.seqs, self.layer_idx)
        h = h + self.cross_attn_attn_gate.tanh() * attn
        mlp = self.mlp(self.post_attention_layernorm(h)) * cross.row_mask.to(h.dtype)
        h = h + self.cross_attn_mlp_gate.tanh() * mlp
        return x.index_copy(0, cross.rows, h)
