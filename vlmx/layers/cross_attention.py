"""Gated cross-attention from text tokens to per-request image states (Mllama / Llama 3.2 Vision).

The image states' keys and values are computed once per request (`CrossAttention.kv`) and kept
by the worker in one pool for the request's life (`vlmx.worker.cross_attention`); each step
passes the pool, the rows that cross-attend, and how they attend (`CrossAttentionMetadata`).
Sequences without images skip the layer (HF skips cross-attention layers when there are no
image states).

```
step rows:   [a0 a1 a2 | b0 | c0 c1]      a, c have images, b has none
rows:        [0 1 2 4 5]                  the rows that cross-attend, gathered once per layer
batch:       rows 0..2 over a's leading keys, rows 3..4 over c's: one varlen call
masked:      after the batch's rows, runs of rows with their own key mask (prefill only)
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
    """Rows of one sequence that attend on their own (with a key mask, or a prefill's rows
    beside the sequence's run in the batch)."""

    start: int  # its rows in the gathered block: start .. end - 1
    end: int
    key_start: int  # its keys in `CrossAttentionMetadata.kv`: key_start .. + num_keys - 1
    num_keys: int
    mask: torch.Tensor | None  # [1, num_keys] bool (True = attend), every row's; None: all


@dataclass(slots=True)
class CrossBatch:
    """The sequences whose rows all attend to a run of their keys with no mask (every decode
    row, most prefill rows), as one batch of segments over the whole pool: their rows are the first
    rows of the gathered block, in the order of their keys in the pool, and the pool's keys no
    sequence reads form segments of no query between them.

    ```
    pool keys:  [ gap | a's keys | gap | b's keys ]      cu_k = [0, g0, g0 + a, ...]
    queries:    [     | a0 a1    |     | b0       ]      cu_q = [0, 0, 2, 2, 3]
    ```"""

    num_rows: int
    cu_q: list[int]  # [S + 1] segment bounds in the rows
    cu_k: list[int]  # [S + 1] segment bounds in the pool's keys


@dataclass(slots=True)
class CrossAttentionMetadata:
    """The cross-attention part of one step (built by the worker; None when no sequence of the
    step has images)."""

    rows: torch.Tensor  # [R] int64, the step rows that cross-attend (gathered block order)
    row_mask: torch.Tensor  # [R, 1] float, 0 = the row sees no image (MLP branch zeroed)
    kv: torch.Tensor  # [num_cross_layers, 2, num_keys, kv_heads, head_dim]: the worker's pool
    batch: CrossBatch | None  # the gathered block's first rows
    masked: list[CrossSequence]  # the rows after them


def _batch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: CrossBatch):
    """q [b.num_rows, heads, head_dim], k / v [pool keys, kv_heads, head_dim] -> like q."""
    # NOTE: one varlen FlashAttention call over all segments failed on CUDA (its one-query GQA
    # path assumes one query per segment, and the unread keys are segments of none): until
    # that is rebuilt and checked on a GPU, one fused SDPA call per sequence.
    out = torch.empty_like(q)
    for i in range(len(b.cu_q) - 1):
        qs, qe, ks, ke = b.cu_q[i], b.cu_q[i + 1], b.cu_k[i], b.cu_k[i + 1]
        if qe > qs:
            out[qs:qe] = _sdpa(q[qs:qe], k[ks:ke], v[ks:ke], None)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """One sequence: q [n, heads, hd], k / v [N, kv_heads, hd], mask [1, N] or None ->
    [n, heads, hd].

    4-D inputs, each KV head's group of query heads folded into its query rows: SDPA's fused
    kernels take no 3-D inputs, and its fallback (the math path) copies the keys and values
    once per query head of a group on every call."""
    n, heads, hd = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    assert mask is None or mask.shape[0] == 1, mask.shape  # one mask for all rows
    q = q.view(n, kv_heads, group, hd).permute(1, 2, 0, 3).reshape(1, kv_heads, group * n, hd)
    o = F.scaled_dot_product_attention(
        q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask
    )  # [1, kv_heads, group * n, hd]
    return o.view(kv_heads, group, n, hd).permute(2, 0, 1, 3).reshape(n, heads, hd)


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

    def forward(
        self, x: torch.Tensor, cross: CrossAttentionMetadata, layer_idx: int
    ) -> torch.Tensor:
        """x [R, hidden] (the gathered rows) -> [R, hidden]."""
        r = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(r, self.num_heads, self.head_dim))
        k, v = cross.kv[layer_idx]  # [pool keys, kv_heads, head_dim] each
        batch = cross.batch
        if batch is not None and not cross.masked:
            out = _batch_attention(q, k, v, batch)
        else:
            out = torch.empty_like(q)
            if batch is not None:
                out[: batch.num_rows] = _batch_attention(q[: batch.num_rows], k, v, batch)
            for seq in cross.masked:
                keys = slice(seq.key_start, seq.key_start + seq.num_keys)
                out[seq.start : seq.end] = _sdpa(q[seq.start : seq.end], k[keys], v[keys], seq.mask)
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
        attn = self.cross_attn(self.input_layernorm(h), cross, self.layer_idx)
        h = h + self.cross_attn_attn_gate.tanh() * attn
        mlp = self.mlp(self.post_attention_layernorm(h)) * cross.row_mask.to(h.dtype)
        h = h + self.cross_attn_mlp_gate.tanh() * mlp
        return x.index_copy(0, cross.rows, h)
