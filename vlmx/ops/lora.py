"""Batched LoRA over a flat batch whose tokens use different adapters (Punica / S-LoRA style).

The adapters live in slots: `A [num_slots, num_parts * R, in]` (each part's A in its own R rows,
zero past the adapter's rank) and `B [num_slots, out, R]` (scale folded in; zero rows where a
part is padding). A step's tokens are grouped by slot (`LoRATokenGroups`), tokens without an
adapter in no group. For a layer y = base(x):

```
shrink:  t [T, num_parts * R] = x[tokens of slot s] @ A[s]^T            (float32)
expand:  y[tokens of slot s, part i's rows] += t[:, i*R:(i+1)*R] @ B[s, part i's rows]^T
```
The Triton kernels launch one grid over (token blocks, output blocks, slots) whose shape
depends only on the number of tokens, so CUDA graphs can hold them; a program past its slot's
tokens returns at once. `lora_apply_torch` is the reference and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmx.ops.triton_support import tl, triton


@dataclass(slots=True)
class LoRATokenGroups:
    """A step's tokens grouped by slot, on the device: `token_idx[starts[s] : starts[s] +
    counts[s]]` are the rows of slot s. Tokens without an adapter are in no group."""

    token_idx: torch.Tensor  # [>= num adapted tokens] int32 (persistent buffers may be longer)
    starts: torch.Tensor  # [num_slots] int32
    counts: torch.Tensor  # [num_slots] int32
    # The same groups on the host, for the torch path: (slot, rows [n] int64 on the device).
    rows_by_slot: list[tuple[int, torch.Tensor]] | None = None


def group_tokens(token_slots: np.ndarray, num_slots: int) -> tuple[np.ndarray, ...]:
    """[T] slot per token (-1: none) -> (token indexes grouped by slot [n] int32, each slot's
    start [num_slots] int32 and count [num_slots] int32 in them)."""
    adapted = np.flatnonzero(token_slots >= 0)
    order = adapted[np.argsort(token_slots[adapted], kind="stable")].astype(np.int32)
    counts = np.bincount(token_slots[adapted], minlength=num_slots).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return order, starts, counts


def lora_apply_torch(
    x: torch.Tensor,  # [T, in]
    y: torch.Tensor,  # [T, out], updated in place
    a: torch.Tensor,  # [num_slots, num_parts * R, in]
    b: torch.Tensor,  # [num_slots, out, R]
    slices: tuple[tuple[int, int], ...],  # (row offset, rows) of each part of y
    rows_by_slot: list[tuple[int, torch.Tensor]],
) -> None:
    rank = b.shape[-1]
    acc = torch.promote_types(y.dtype, torch.float32)
    for slot, rows in rows_by_slot:
        xs = x.index_select(0, rows)
        t = xs.to(acc) @ a[slot].to(acc).T  # [n, num_parts * R]
        delta = torch.zeros(rows.numel(), y.shape[1], dtype=acc, device=y.device)
        for i, (offset, size) in enumerate(slices):
            part = b[slot, offset : offset + size].to(acc)  # [size, R]
            delta[:, offset : offset + size] = t[:, i * rank : (i + 1) * rank] @ part.T
        y.index_add_(0, rows, delta.to(y.dtype))


def lora_apply_dense(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,  # [num_parts * R, in] one slot's
    b: torch.Tensor,  # [out, R]
    slices: tuple[tuple[int, int], ...],
) -> None:
    """Every row of x through one adapter (the vision encoder's batch of one adapter)."""
    rank = b.shape[-1]
    t = x @ a.T  # [..., num_parts * R]
    for i, (offset, size) in enumerate(slices):
        y[..., offset : offset + size] += (
            t[..., i * rank : (i + 1) * rank] @ b[offset : offset + size].T
        )


def _block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 512 else 64


def lora_apply_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slices: tuple[tuple[int, int], ...],
    slice_table: torch.Tensor,  # [num_parts, 2] int32 on the device: (offset, rows) of slices
    groups: LoRATokenGroups,
) -> None:
    """`lora_apply_torch` in two Triton launches (shrink, expand); y must be contiguous."""
    num_tokens, in_features = x.shape
    num_slots, num_r, _ = a.shape
    rank = b.shape[-1]
    assert x.stride(-1) == 1 and y.is_contiguous() and a.is_contiguous() and b.is_contiguous()
    block_m = _block_m(num_tokens)
    block_n = max(16, min(64, triton.next_power_of_2(num_r)))
    split_k = 1 if num_tokens > 512 else max(1, min(8, in_features // 1024))
    # NOTE: rows of tokens without an adapter are never read: only split-K's sums need zeros
    alloc = torch.zeros if split_k > 1 else torch.empty
    shrunk = alloc(num_tokens, num_r, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(num_r, block_n) * split_k, num_slots)
    _shrink_kernel[grid](
        x, a, shrunk, groups.token_idx, groups.starts, groups.counts,
        in_features, num_r, x.stride(0), a.stride(0), a.stride(1), shrunk.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, SPLIT_K=split_k,
    )  # fmt: skip
    max_rows = max(size for _, size in slices)
    block_out = 64
    num_out_blocks = triton.cdiv(max_rows, block_out)
    grid = (triton.cdiv(num_tokens, block_m), len(slices) * num_out_blocks, num_slots)
    _expand_kernel[grid](
        shrunk, b, y, groups.token_idx, groups.starts, groups.counts, slice_table,
        rank, shrunk.stride(0), b.stride(0), b.stride(1), y.stride(0), num_out_blocks,
        BLOCK_M=block_m, BLOCK_N=block_out, BLOCK_R=max(16, min(64, triton.next_power_of_2(rank))),
    )  # fmt: skip


if triton is not None:

    @triton.jit(do_not_specialize=["in_features", "stride_xm", "stride_om"])
    def _shrink_kernel(
        x_ptr, a_ptr, out_ptr, idx_ptr, start_ptr, count_ptr,
        in_features, num_r, stride_xm, stride_as, stride_an, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_nk, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        count = tl.load(count_ptr + slot)
        if pid_m * BLOCK_M >= count:
            return
        pid_n, pid_k = pid_nk // SPLIT_K, pid_nk % SPLIT_K
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < count
        rows = tl.load(idx_ptr + tl.load(start_ptr + slot) + offs_m, mask=m_mask, other=0)
        rows = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < num_r
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, in_features, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < in_features
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            at = tl.load(
                a_base + offs_n[None, :] * stride_an + offs_k[:, None],
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc += tl.dot(xt, at)
        ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(ptrs, acc, mask=mask)
        else:
            tl.atomic_add(ptrs, acc, mask=mask)

    @triton.jit(do_not_specialize=["stride_sm", "stride_ym"])
    def _expand_kernel(
        s_ptr, b_ptr, y_ptr, idx_ptr, start_ptr, count_ptr, slice_ptr,
        rank, stride_sm, stride_bs, stride_bn, stride_ym, num_out_blocks,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_sn, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        count = tl.load(count_ptr + slot)
        if pid_m * BLOCK_M >= count:
            return
        part, block = pid_sn // num_out_blocks, pid_sn % num_out_blocks
        offset = tl.load(slice_ptr + 2 * part)
        size = tl.load(slice_ptr + 2 * part + 1)
        if block * BLOCK_N >= size:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < count
        rows = tl.load(idx_ptr + tl.load(start_ptr + slot) + offs_m, mask=m_mask, other=0)
        rows = rows.to(tl.int64)
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < size
        b_base = b_ptr + slot.to(tl.int64) * stride_bs + (offset + offs_n)[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            st = tl.load(
                s_ptr + rows[:, None] * stride_sm + part * rank + offs_r[None, :],
                mask=m_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            bt = tl.load(
                b_base + offs_r[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0
            )
            acc += tl.dot(st.to(bt.dtype), bt)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + (offset + offs_n)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)
