"""Batched LoRA over a flat batch whose tokens use different adapters (Punica / S-LoRA style).

The adapters live in slots: `A [num_slots, num_parts * R, in]` (each part's A in its own R rows,
zero past the adapter's rank) and `B [num_slots, out, R]` (scale folded in; zero rows where a
part is padding). A step's tokens are grouped by slot (`LoRATokenGroups`), tokens without an
adapter in no group. For a layer y = base(x):

```
shrink:  t [T, num_parts * R] = x[tokens of slot s] @ A[s]^T            (float32)
expand:  y[tokens of slot s, part i's rows] += t[:, i*R:(i+1)*R] @ B[s, part i's rows]^T
```
The Triton kernels launch grids over (token blocks, ..., slots) whose shapes depend only on
the number of tokens, so CUDA graphs can hold them; a program past its slot's tokens returns at
once. The shrink is a skinny GEMM bound by reading x: it splits K over the grid (a decode step
of 256 tokens still has hundreds of programs), each program writing its float32 partial sum to
its own plane of `partials [split_k, T, num_parts * R]`; the expand sums the planes as it loads
t, so nothing needs zeroing and no atomics make the sums order-dependent. Each expand program
reuses its t for `n_iters` output blocks. `lora_apply_torch` is the reference and the CPU path.
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


# Launch shapes, sized for an H100/H200 (132 SMs): a few hundred programs per launch at decode.
_SHRINK_BLOCK_K = 128
_MIN_K_CHUNK = 256  # inputs per split-K program, at least
_MAX_SPLIT_K = 16
_TARGET_PROGRAMS = 512
_MAX_PARTIALS_A_LOAD = 8192  # float32 values of partial planes one expand program loads at once


def _block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 512 else 64


def _split_k(m_blocks: int, in_features: int) -> tuple[int, int]:
    """(number of K chunks, inputs per chunk: a multiple of the shrink's BLOCK_K)."""
    split = min(_MAX_SPLIT_K, _TARGET_PROGRAMS // m_blocks, triton.cdiv(in_features, _MIN_K_CHUNK))
    chunk = triton.cdiv(triton.cdiv(in_features, max(1, split)), _SHRINK_BLOCK_K)
    chunk *= _SHRINK_BLOCK_K
    return triton.cdiv(in_features, chunk), chunk


def _expand_blocks(rank: int) -> tuple[int, int]:
    """(BLOCK_R: the whole rank in one tile, BLOCK_N: output columns per tile)."""
    block_r = max(16, triton.next_power_of_2(rank))
    return block_r, 128 if block_r <= 32 else 64 if block_r <= 128 else 32


def _planes_a_load(split_k: int, plane_tile: int) -> int:
    """Partial planes the expand loads at once: all of them, up to 8192 float32 values."""
    fit = max(1, _MAX_PARTIALS_A_LOAD // plane_tile)
    return min(triton.next_power_of_2(split_k), 1 << (fit.bit_length() - 1))


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
    if num_tokens == 0:
        return
    block_m = _block_m(num_tokens)
    m_blocks = triton.cdiv(num_tokens, block_m)
    split_k, k_chunk = _split_k(m_blocks, in_features)
    block_n = max(16, min(128, triton.next_power_of_2(num_r)))
    # NOTE: every plane's rows of adapted tokens are written; the other rows are never read
    partials = torch.empty(split_k, num_tokens, num_r, dtype=torch.float32, device=x.device)
    grid = (m_blocks, triton.cdiv(num_r, block_n) * split_k, num_slots)
    _shrink_kernel[grid](
        x, a, partials, groups.token_idx, groups.starts, groups.counts,
        in_features, num_r, split_k, k_chunk, x.stride(0), a.stride(0), a.stride(1),
        partials.stride(0), partials.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_SHRINK_BLOCK_K, num_warps=4,
    )  # fmt: skip
    block_r, block_out = _expand_blocks(rank)
    col_blocks = triton.cdiv(max(size for _, size in slices), block_out)
    # a power of two: few kernel variants across the captured batch sizes
    n_iters = max(1, min(8, m_blocks * len(slices) * col_blocks // _TARGET_PROGRAMS))
    n_iters = 1 << (n_iters.bit_length() - 1)
    num_chunks = triton.cdiv(col_blocks, n_iters)
    grid = (m_blocks, len(slices) * num_chunks, num_slots)
    _expand_kernel[grid](
        partials, b, y, groups.token_idx, groups.starts, groups.counts, slice_table,
        rank, split_k, partials.stride(0), partials.stride(1), b.stride(0), b.stride(1),
        y.stride(0), num_chunks,
        BLOCK_M=block_m, BLOCK_N=block_out, BLOCK_R=block_r, N_ITERS=n_iters,
        S_TILE=_planes_a_load(split_k, block_m * block_r), num_warps=4,
    )  # fmt: skip


if triton is not None:

    @triton.jit(do_not_specialize=["stride_pk"])
    def _shrink_kernel(
        x_ptr, a_ptr, p_ptr, idx_ptr, start_ptr, count_ptr,
        in_features, num_r, split_k, k_chunk, stride_xm, stride_as, stride_an,
        stride_pk, stride_pm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """partials[k, rows of slot, n block] = x[rows, K chunk k] @ A[slot, n block, chunk]^T."""
        pid_m, pid_nk, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        count = tl.load(count_ptr + slot)
        if pid_m * BLOCK_M >= count:
            return
        pid_n, pid_k = pid_nk // split_k, pid_nk % split_k
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < count
        rows = tl.load(idx_ptr + tl.load(start_ptr + slot) + offs_m, mask=m_mask, other=0)
        rows = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < num_r
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        k_start = pid_k * k_chunk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_chunk, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
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
        ptrs = p_ptr + pid_k * stride_pk + rows[:, None] * stride_pm + offs_n[None, :]
        tl.store(ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit(do_not_specialize=["stride_pk"])
    def _expand_kernel(
        p_ptr, b_ptr, y_ptr, idx_ptr, start_ptr, count_ptr, slice_ptr,
        rank, split_k, stride_pk, stride_pm, stride_bs, stride_bn, stride_ym, num_chunks,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        N_ITERS: tl.constexpr, S_TILE: tl.constexpr,
    ):  # fmt: skip
        """y[rows of slot, part's columns of chunk] += (sum over k of partials[k]) @ B^T."""
        pid_m, pid_pc, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        count = tl.load(count_ptr + slot)
        if pid_m * BLOCK_M >= count:
            return
        part, chunk = pid_pc // num_chunks, pid_pc % num_chunks
        offset = tl.load(slice_ptr + 2 * part)
        size = tl.load(slice_ptr + 2 * part + 1)
        col0 = chunk * (N_ITERS * BLOCK_N)
        if col0 >= size:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < count
        rows = tl.load(idx_ptr + tl.load(start_ptr + slot) + offs_m, mask=m_mask, other=0)
        rows = rows.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        # t: S_TILE planes a load [S_TILE, BLOCK_M, BLOCK_R] (in flight at once), summed
        offs_s = tl.arange(0, S_TILE)
        t_ptrs = (
            p_ptr
            + offs_s[:, None, None] * stride_pk
            + rows[None, :, None] * stride_pm
            + (part * rank + offs_r)[None, None, :]
        )
        t_mask = m_mask[None, :, None] & r_mask[None, None, :]
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s0 in range(0, split_k, S_TILE):
            mask = t_mask & (s0 + offs_s < split_k)[:, None, None]
            t += tl.sum(tl.load(t_ptrs + s0 * stride_pk, mask=mask, other=0.0), axis=0)
        t = t.to(b_ptr.dtype.element_ty)
        b_base = b_ptr + slot.to(tl.int64) * stride_bs + offset * stride_bn
        for i in range(N_ITERS):
            offs_n = col0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < size
            bt = tl.load(
                b_base + offs_n[None, :] * stride_bn + offs_r[:, None],
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(t, bt)
            y_ptrs = y_ptr + rows[:, None] * stride_ym + (offset + offs_n)[None, :]
            mask = m_mask[:, None] & n_mask[None, :]
            y = tl.load(y_ptrs, mask=mask, other=0.0)
            tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)
