"""Varlen FlashAttention through `torch.nn.attention.varlen.varlen_attn`, across torch versions.

Sequences are packed along the token dim and delimited by cumulative lengths, so one call covers
a whole step's prefills (or a vision tower's images and windows) with no padding and no mask:

```
query rows:  [a0 a1 a2 | b0 b1 | c0 c1 c2 c3]     cu_seq_q = [0, 3, 5, 9]
key rows:    [a0 .. a6 | b0 b1 | c0 .. c3]        cu_seq_k = [0, 7, 9, 13]   (a has 4 cached)
```

Causal attention with fewer queries than keys is aligned bottom-right (FlashAttention's rule):
query j of a sequence with q queries and k keys sees keys `0 .. k - q + j`, which is what a
prefill chunk after cached context needs.

The public signature moved between torch releases: 2.10 takes `is_causal`, later ones take
`window_size` (`(-1, 0)` = causal) and an `enable_gqa` flag. A causal sliding window W (HF's
`kv_idx > q_idx - W`) is `window_size = (W - 1, 0)`: a query sees itself and the W - 1 keys
before it; only the later releases have it (`flash_window_available`). FlashAttention itself
reads key / value heads shared by groups of query heads, so no head is expanded here.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def flash_varlen_available(device: torch.device) -> bool:
    """Whether `varlen_flash_attention` runs on `device` (CUDA, compute capability 8.0+)."""
    if device.type != "cuda" or _varlen_attn()[0] is None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def flash_window_available() -> bool:
    """Whether `varlen_flash_attention` takes a `sliding_window` (torch's `window_size`)."""
    return "window_size" in _varlen_attn()[1]


def varlen_flash_attention(
    query: torch.Tensor,  # [total_q, num_heads, head_dim]
    key: torch.Tensor,  # [total_k, num_kv_heads, head_dim]
    value: torch.Tensor,  # [total_k, num_kv_heads, head_dim]
    cu_seq_q: torch.Tensor,  # [num_seqs + 1] int32, on the device
    cu_seq_k: torch.Tensor,  # [num_seqs + 1] int32, on the device
    max_q: int,
    max_k: int,
    *,
    causal: bool,
    scale: float | None = None,
    sliding_window: int | None = None,  # causal only: each query sees its last W keys
) -> torch.Tensor:
    """Attention inside each packed sequence; returns `[total_q, num_heads, head_dim]`."""
    fn, params = _varlen_attn()
    if fn is None:
        raise RuntimeError("this torch has no torch.nn.attention.varlen; use the torch backend")
    assert sliding_window is None or (causal and "window_size" in params)
    kwargs: dict = {"scale": scale}
    if "window_size" in params:
        left = -1 if sliding_window is None else sliding_window - 1
        kwargs["window_size"] = (left, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if "enable_gqa" in params and key.shape[1] != query.shape[1]:
        kwargs["enable_gqa"] = True
    return fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)
