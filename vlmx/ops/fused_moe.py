"""Fused mixture-of-experts in Triton: the routed experts of `vlmx.layers.moe.MoEMLP`.

`moe_experts_torch` (layers/moe.py) is the reference: expert by expert, gather, two GEMMs,
scatter-add. Here the (token, slot) pairs are sorted by expert once and padded so that each
block of BLOCK_M rows belongs to one expert (`moe_align`), and each projection is one grouped
GEMM over all the experts' blocks:

```
topk_ids [T, k] --moe_align--> sorted_ids [P_max]  pair index (t * k + j) per row, P = T*k padding
                               block_experts [P_max / BLOCK_M]  the block's expert, -1 past the end
rows of expert 0 (padded to BLOCK_M) | rows of expert 1 | ... | unused blocks (-1)

kernel 1, grid (blocks, I / BLOCK_N):  h[pair] = silu(x[t] @ w13[e][:, :I]) * (x[t] @ w13[e][:, I:])
kernel 2, grid (blocks, H / BLOCK_N):  y[pair] = weight[pair] * (h[pair] @ w2[e])
out [T, H] = y.view(T, k, H).sum(1)     (the weighted sum of the top-k outputs)
```

P_max = T*k + E*(BLOCK_M - 1) bounds the padded length, so the grid and every buffer come from
shapes: nothing waits for the host (the decode step's CUDA graph captures it), and blocks past
the last expert's rows exit at once. An expert no token picked has no block. Accumulation is in
float32; `h` and `y` are rounded to the activations' dtype where the reference rounds them.
"""

from __future__ import annotations

import torch

from vlmx.ops.triton_support import tl, triton, triton_available

FUSED_MOE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fused_moe_available(*tensors: torch.Tensor) -> bool:
    """Whether `fused_moe` takes these tensors: one device Triton runs on (CUDA, or the CPU
    under the interpreter), a supported dtype, no autograd graph."""
    if not tensors or not triton_available(tensors[0].device):
        return False
    grad = torch.is_grad_enabled()
    return all(
        t.device == tensors[0].device
        and t.dtype in FUSED_MOE_DTYPES
        and not (grad and t.requires_grad)
        for t in tensors
    )


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [P_max] int32, block_experts [P_max / block_m] int32), drawn above.

    Rows of padding (and of unused blocks) hold T * k, an index past every pair. Device ops
    only, no host sync.
    """
    flat = topk_ids.flatten()  # [P] = [T * k]
    num_pairs = flat.numel()
    device = flat.device
    max_rows = num_pairs + num_experts * (block_m - 1)
    max_rows = -(-max_rows // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded
    count_start = torch.cumsum(counts, 0) - counts  # [E] first sorted position per expert
    order = torch.argsort(flat, stable=True)  # [P] pair indexes, grouped by expert
    experts_sorted = flat[order]  # [P]
    rank = torch.arange(num_pairs, device=device) - count_start[experts_sorted]
    dest = padded_start[experts_sorted] + rank  # [P] row of each sorted pair
    sorted_ids = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=device)  # [blocks]
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)  # [blocks]
    block_experts = torch.where(block_experts < num_experts, block_experts, -1)
    return sorted_ids, block_experts.to(torch.int32)


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: near the mean rows per expert (less padding at decode), 16..64."""
    mean = num_pairs / num_experts
    return 16 if mean <= 16 else 32 if mean <= 32 else 64


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [E, H, 2I]
    w_down: torch.Tensor,  # [E, I, H]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k] int
    block_m: int | None = None,
) -> torch.Tensor:
    """The routed experts' weighted sum, as `moe_experts_torch` computes it: [T, H]."""
    num_tokens, hidden = x.shape
    num_experts, _, two_i = w_gate_up.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    assert w_down.shape == (num_experts, inter, hidden), (w_down.shape, w_gate_up.shape)
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(x)
    block_m = block_m or _block_m(num_pairs, num_experts)
    sorted_ids, block_experts = moe_align(topk_ids, num_experts, block_m)
    num_blocks = block_experts.numel()
    x = x.contiguous()
    weights = topk_weights.to(x.dtype).contiguous().flatten()  # [P]
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [P, I]
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [P, H]
    block_n, block_k = (32, 32) if x.device.type == "cpu" else (64, 64)
    # NOTE: float32 inputs multiply in full precision (tl.dot would round them to TF32), so a
    # float32 run matches the torch reference; 16-bit inputs are unaffected.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    w13, w2 = w_gate_up, w_down

    grid1 = (num_blocks, triton.cdiv(inter, block_n))
    _gate_up_kernel[grid1](
        x, w13, h, sorted_ids, block_experts,
        num_pairs, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
    )  # fmt: skip
    grid2 = (num_blocks, triton.cdiv(hidden, block_n))
    _down_kernel[grid2](
        h, w2, y, weights, sorted_ids, block_experts,
        num_pairs, inter, hidden,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
    )  # fmt: skip
    # NOTE: the reference adds the k outputs of a token one expert at a time in x.dtype.
    return y.view(num_tokens, top_k, hidden).sum(1, dtype=torch.float32).to(x.dtype)


if triton is not None:

    @triton.jit
    def _gate_up_kernel(
        x_ptr, w_ptr, h_ptr, sorted_ids_ptr, block_experts_ptr,
        num_pairs, top_k, K, N,
        stride_xt, stride_we, stride_wk, stride_wn, stride_hp,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """h[pair, n] = silu(x[t] @ w[e][:, n]) * (x[t] @ w[e][:, N + n]) for a block of one
        expert's pairs (t = pair // top_k) and BLOCK_N of the N = I columns."""
        block = tl.program_id(0)
        expert = tl.load(block_experts_ptr + block)
        if expert < 0:
            return
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ids_ptr + rows)  # [BM]
        valid = pairs < num_pairs
        tokens = tl.where(valid, pairs // top_k, 0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        col_ok = cols < N
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                x_ptr + tokens[:, None].to(tl.int64) * stride_xt + ks[None, :],
                mask=valid[:, None] & k_ok[None, :],
                other=0.0,
            )  # [BM, BK]
            w_rows = w_base + ks[:, None] * stride_wk
            mask = k_ok[:, None] & col_ok[None, :]
            b_gate = tl.load(w_rows + cols[None, :] * stride_wn, mask=mask, other=0.0)
            b_up = tl.load(w_rows + (N + cols[None, :]) * stride_wn, mask=mask, other=0.0)
            acc_gate = tl.dot(a, b_gate, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        # the reference rounds both GEMM outputs to x's dtype, then silu, then the product
        dtype = h_ptr.dtype.element_ty
        gate = acc_gate.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        out = (act * up).to(dtype)
        tl.store(
            h_ptr + pairs[:, None].to(tl.int64) * stride_hp + cols[None, :],
            out,
            mask=valid[:, None] & col_ok[None, :],
        )

    @triton.jit
    def _down_kernel(
        h_ptr, w_ptr, y_ptr, weights_ptr, sorted_ids_ptr, block_experts_ptr,
        num_pairs, K, N,
        stride_hp, stride_we, stride_wk, stride_wn, stride_yp,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """y[pair, n] = weight[pair] * (h[pair] @ w[e][:, n]) for a block of one expert's pairs
        and BLOCK_N of the N = H columns."""
        block = tl.program_id(0)
        expert = tl.load(block_experts_ptr + block)
        if expert < 0:
            return
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ids_ptr + rows)
        valid = pairs < num_pairs
        safe = tl.where(valid, pairs, 0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                h_ptr + safe[:, None] * stride_hp + ks[None, :],
                mask=valid[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        dtype = y_ptr.dtype.element_ty
        weight = tl.load(weights_ptr + safe, mask=valid, other=0.0).to(tl.float32)
        out = (acc.to(dtype).to(tl.float32) * weight[:, None]).to(dtype)
        tl.store(
            y_ptr + safe[:, None] * stride_yp + cols[None, :],
            out,
            mask=valid[:, None] & col_ok[None, :],
        )
