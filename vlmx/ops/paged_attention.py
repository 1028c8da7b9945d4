"""Triton kernels over the paged KV cache: the KV store and decode attention, with torch references.

KV cache layout, one tensor per layer (as in `vlmx.layers.attention`):

```
kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = keys, 1 = values)
slot = block_id * block_size + offset_in_block                  (slot < 0: padding, skipped)
```

Decode attention: one query per sequence, attending to the sequence's `seq_len` cached keys,
or with a sliding window W to its last W keys only (`seq_len - W .. seq_len - 1`: HF's
`kv_idx > q_idx - W`); the key range below then starts there.
A program owns one (sequence, KV head, split) and folds the KV head's group of query heads into
the rows of one `tl.dot` (padded to 16 rows), so each key / value is read once per KV head.
It walks its key range in tiles of `TILE_N` keys, gathering each key's block id from the table:

```
decode kernel, grid = (batch, num_kv_heads, num_splits)

keys of one sequence: | tile | tile | tile | tile | tile | tile | tile |..|   seq_len keys, in
                      |<----- split 0 ---->|<----- split 1 ---->|<- 2 ->|   whole tiles / split
                                 |                    |             |
            partial (m, l, acc) of each query head, float32 [batch, num_heads, num_splits]
                                 |                    |             |
                                 +--------------------+-------------+
                                                      |
combine kernel, grid = (batch, num_heads):   w_s = exp(m_s - max m),
                                             out = sum_s w_s acc_s / sum_s w_s l_s
```

With one split the first kernel normalises and writes the output itself. The number of splits
("flash decoding") depends on shapes only (batch, KV heads, table width), and each program finds
its key range from its sequence's length on the device, so a launch never waits for the host and
can be captured in a CUDA graph. Splits past the end of a short sequence have nothing to do and
write an empty partial (m = -inf, l = 0); a padding row (seq_len 0) gives zeros.

Triton is imported guarded (`ops/triton_support.py`): without it (e.g. macOS) this module still
imports and `triton_available` says False. With `TRITON_INTERPRET=1` the kernels run on CPU
tensors in Triton's interpreter (slow; for tests). The variable must be set before
`triton.language` is first imported by anyone: Triton wraps its own library functions
(`tl.zeros`, `tl.max`, ...) as compiled or interpreted at that import, and refuses to mix the
two.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from vlmx.ops.paged_reference import (
    NO_WINDOW,
    check_decode_args,
    check_store_args,
    paged_decode_attention_torch,
    store_kv_torch,
)
from vlmx.ops.triton_support import interpret as _interpret
from vlmx.ops.triton_support import num_sms, tl, triton, triton_available

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_torch",
    "store_kv",
    "store_kv_torch",
    "triton_available",
]

# Flash-decoding heuristics. NOTE: untuned guesses for H100 / H200; split while there are fewer
# programs than two per SM, but give each split at least this many keys of the table's span.
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 32
_DEFAULT_NUM_SMS = 132  # an H100 SXM, for the interpreter


# ---------------------------------------------------------------------------------------------
# KV store
# ---------------------------------------------------------------------------------------------


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], any strides
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], any strides
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim] contiguous
    slot_mapping: torch.Tensor,  # [num_tokens] int64, < 0 = padding row, not written
) -> None:
    """Write each token's key / value into its cache slot (Triton); negative slots are skipped."""
    check_store_args(key, value, kv_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _kernels().store_kv[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        *key.stride(),
        *value.stride(),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


# ---------------------------------------------------------------------------------------------
# Decode attention
# ---------------------------------------------------------------------------------------------


def paged_decode_attention(
    query: torch.Tensor,  # [batch, num_heads, head_dim] bf16 / fp16 / fp32, any strides
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim] contiguous
    block_tables: torch.Tensor,  # [batch, max_blocks] int32; entries past a sequence unread
    seq_lens: torch.Tensor,  # [batch] int32, keys per sequence; 0 = padding row (zeros out)
    scale: float,
    out: torch.Tensor | None = None,  # [batch, num_heads, head_dim], query dtype, any strides
    *,
    num_splits: int | None = None,  # None: from shapes (`choose_num_splits`)
    sliding_window: int | None = None,  # None: every key; W: the last W keys
) -> torch.Tensor:
    """Attention of one query per sequence over its cached keys (Triton, CUDA-graph safe)."""
    check_decode_args(query, kv_cache, block_tables, seq_lens, sliding_window)
    batch, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(
            f"out must be {list(query.shape)} {query.dtype}, got {list(out.shape)} {out.dtype}"
        )
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(
            batch,
            num_kv_heads,
            block_tables.shape[1],
            block_size,
            num_sms(query.device, _DEFAULT_NUM_SMS),
        )
    elif num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")

    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    # NOTE: the interpreter multiplies bf16 bit patterns in tl.dot (Triton documents bf16 as
    # unsupported there), so it gets float32 operands; fp32 queries use exact fp32 products.
    fp32_dot = query.dtype == torch.float32 or (_interpret() and query.dtype == torch.bfloat16)
    if num_splits == 1:
        m_part = l_part = acc_part = out  # unused by the kernel: it writes `out` directly
    else:
        rows = batch * num_heads * num_splits
        m_part = torch.empty(rows, device=query.device, dtype=torch.float32)
        l_part = torch.empty(rows, device=query.device, dtype=torch.float32)
        acc_part = torch.empty(rows, head_dim, device=query.device, dtype=torch.float32)

    kernels = _kernels()
    kernels.decode[(batch, num_kv_heads, num_splits)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        out,
        m_part,
        l_part,
        acc_part,
        scale * math.log2(math.e),
        sliding_window or NO_WINDOW,
        *query.stride(),
        *out.stride(),
        *block_tables.stride(),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        # NOTE: at head_dim 128, 64-key tiles compile (sm90, ptxas) to ~85 registers and 39 KiB
        # of pipelined shared memory with 4 warps; not yet tuned on hardware.
        TILE_N=64 if block_d >= 128 or fp32_dot else 128,
        FP32_DOT=fp32_dot,
        num_warps=4,
    )
    if num_splits > 1:
        kernels.combine[(batch, num_heads)](
            m_part,
            l_part,
            acc_part,
            out,
            *out.stride(),
            NUM_SPLITS=num_splits,
            HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=4 if head_dim >= 128 else 2,
        )
    return out


def choose_num_splits(
    batch: int, num_kv_heads: int, max_blocks: int, block_size: int, num_sms: int
) -> int:
    """How many programs share each (sequence, KV head): from shapes only, never lengths.

    A power of two, so that few variants of the kernels (one per split count) get compiled.
    """
    num_programs = batch * num_kv_heads
    if num_programs >= 2 * num_sms:
        return 1
    by_length = max_blocks * block_size // _MIN_KEYS_PER_SPLIT
    num_splits = max(1, min(-(-2 * num_sms // num_programs), by_length, _MAX_SPLITS))
    return 1 << (num_splits.bit_length() - 1)


# ---------------------------------------------------------------------------------------------
# Kernel wrapping
# ---------------------------------------------------------------------------------------------


class _Kernels(NamedTuple):
    store_kv: object
    decode: object
    combine: object


@functools.cache
def _kernels() -> _Kernels:
    # NOTE: wrapped on first use, not at import, where Triton may be missing.
    # NOTE: the block table's row stride (its width, which changes from step to step in eager
    # steps) is not specialised on, so that no step compiles a new variant mid-run; the split
    # counts are all compiled while the decode graphs are captured.
    return _Kernels(
        triton.jit(_store_kv_kernel),
        triton.jit(_decode_kernel, do_not_specialize=["window", "stride_bt_seq"]),
        triton.jit(_combine_kernel),
    )


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions, wrapped by `_kernels`)
# ---------------------------------------------------------------------------------------------


def _store_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_c_kv,
    stride_c_slot,
    stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM) & (slot >= 0)
    k = tl.load(key_ptr + token * stride_kt + offs_h * stride_kh + offs_d * stride_kd, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + offs_h * stride_vh + offs_d * stride_vd, mask=mask)
    dst = cache_ptr + slot * stride_c_slot + offs_h * stride_c_head + offs_d
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_c_kv, v, mask=mask)


def _decode_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    m_ptr,  # [batch * num_heads * NUM_SPLITS] float32 partial max (log2 units)
    l_ptr,  # [batch * num_heads * NUM_SPLITS] float32 partial sum of exp
    acc_ptr,  # [batch * num_heads * NUM_SPLITS, HEAD_DIM] float32 unnormalised partial output
    scale_log2,
    window,  # keys seq_len - window .. seq_len - 1 (a huge window: all keys)
    stride_qb,
    stride_qh,
    stride_qd,
    stride_ob,
    stride_oh,
    stride_od,
    stride_bt_seq,
    stride_bt_block,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)

    first = tl.maximum(seq_len - window, 0)  # the sliding window's first key

    # Whole tiles per split, so that only a sequence's last tile is partial.
    if NUM_SPLITS == 1:
        start = first
        end = seq_len
    else:
        tiles_per_split = tl.cdiv(tl.cdiv(seq_len - first, TILE_N), NUM_SPLITS)
        start = first + split * tiles_per_split * TILE_N
        end = tl.minimum(start + tiles_per_split * TILE_N, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, TILE_N)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h  # query heads of this KV head (rows past GROUP: padding)
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )
    if FP32_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table_ptr = block_tables_ptr + seq * stride_bt_seq
    kv_ptr = cache_ptr + kv_head * stride_c_head
    for tile_start in range(start, end, TILE_N):
        pos = tile_start + offs_n
        mask_n = pos < end
        block_ids = tl.load(table_ptr + (pos // BLOCK_SIZE) * stride_bt_block, mask=mask_n, other=0)
        rows = block_ids.to(tl.int64) * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot
        kv_ptrs = kv_ptr + rows[:, None] + offs_d[None, :]
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(kv_ptrs, mask=mask_kv, other=0.0)
        v = tl.load(kv_ptrs + stride_c_kv, mask=mask_kv, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(mask_n[None, :], s * scale_log2, float("-inf"))  # [BLOCK_H, TILE_N]
        # Every tile holds at least one key, so m_new is finite and no -inf - -inf appears.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32_DOT:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # seq_len 0: acc is 0, so is o
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=mask_h[:, None] & mask_d[None, :],
        )
    else:
        part = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        tl.store(m_ptr + part, m_i, mask=mask_h)
        tl.store(l_ptr + part, l_i, mask=mask_h)
        tl.store(
            acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
            acc,
            mask=mask_h[:, None] & mask_d[None, :],
        )


def _combine_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    stride_od,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
    m = tl.load(m_ptr + part, mask=mask_s, other=float("-inf"))
    l_sum = tl.load(l_ptr + part, mask=mask_s, other=0.0)
    acc = tl.load(
        acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: seq_len 0
    weight = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    denom = tl.sum(weight * l_sum, axis=0)
    o = tl.sum(acc * weight[:, None], axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + offs_d * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )
