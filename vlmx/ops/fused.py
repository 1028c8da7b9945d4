"""Fused Triton kernels for the elementwise layers: RMSNorm (optionally after a residual add),
rotary embedding, and `silu(gate) * up`.

Done in torch, each of these is several kernels and as many passes over memory (RMSNorm: upcast,
square, mean, rsqrt, multiply, downcast, multiply); here each is one pass. The torch versions
in `vlmx.layers` (`rms_norm_torch`, `apply_rotary_torch`, `silu_and_mul_torch`) stay the
reference and the CPU path, and the kernels reproduce their numerics, including every rounding
to the activations' dtype that torch does between two ops:

```
rms_norm      y = x.float() * rsqrt(mean(x.float()^2) + eps)      float32
              out = weight * y.to(x.dtype)                        product in float32, rounded
                                                                  once to promote(weight, x)
add_rms_norm  residual' = (x + residual).to(x.dtype), then rms_norm(residual')
apply_rotary  in cos.dtype D:  a = R_D(x1 * c1),  b = R_D(-x2 * s1),  out1 = R_D(a + b)
                               a = R_D(x2 * c2),  b = R_D( x1 * s2),  out2 = R_D(a + b)
              (R_D: round to D; every product and sum computed in float32), then to x.dtype
silu_and_mul  s = R(g / (1 + exp(-g))) in float32, out = R(s * u)   (R: round to x.dtype)
```

What the order of float32 arithmetic leaves free:

- The sum of squares is a tree reduction whose order differs from torch's, so a row's variance
  can differ from torch's by an ulp of float32 and, rarely, an output element by one ulp of its
  dtype. The rest follows torch's CUDA kernels: the mean is the sum times
  `float(rows) / float(rows * hidden)` (as torch's `MeanOps` does; its CPU kernel divides) and
  the reciprocal square root, `exp` (libdevice `__nv_expf`, what torch's `expf` is) and the
  correctly rounded division are the ones torch's kernels call.
- Multiply-adds are fused exactly where torch's compiled kernels fuse them. RMSNorm and rotary
  are built with `enable_fp_fusion=False`: torch squares, sums, multiplies and adds in separate
  kernels, each rounding. SiLU keeps fusion on: nvcc folds the last multiply of torch's `expf`
  into `1 + exp(-x)` (one FFMA in the sm_90 SASS of torch 2.14 and of this kernel, checked by
  disassembly), so `1 + exp(-x)` is rounded once there too.

All launch parameters come from shapes, and nothing waits for the host, so the kernels can be
captured in a CUDA graph. Triton is imported guarded (via `vlmx.ops.paged_attention`): without it
this module imports and `fused_available` says False. Under Triton's CPU interpreter
(`TRITON_INTERPRET=1`, for tests) the kernels run on CPU tensors; there `exp` is numpy's, as the
interpreter has no libdevice.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple

import torch

from vlmx.ops.triton_support import interpret as _interpret
from vlmx.ops.triton_support import tl, triton, triton_available

try:
    from triton.language.extra import libdevice
except ImportError:  # NOTE: no Triton, or one without the libdevice wrappers
    libdevice = None

FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Rows wider than this go to the torch path: a program holds its whole row in registers.
MAX_NORM_HIDDEN = 32768
_ELEMS_PER_PROGRAM = 2048  # norm: rows per program = this / padded row width, at least one
_SILU_BLOCK = 1024  # silu_and_mul: columns per program


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------


def fused_available(*tensors: torch.Tensor) -> bool:
    """Whether the kernels here can take these tensors: one device Triton runs on (CUDA, or CPU
    under the interpreter), float32 / bfloat16 / float16, and no autograd graph to keep."""
    if not tensors or not triton_available(tensors[0].device):
        return False
    grad = torch.is_grad_enabled()
    return all(
        t.device == tensors[0].device and t.dtype in FUSED_DTYPES and not (grad and t.requires_grad)
        for t in tensors
    )


def can_fuse_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    hidden = x.shape[-1] if x.dim() else 0
    return (
        0 < hidden <= MAX_NORM_HIDDEN
        and tuple(weight.shape) == (hidden,)
        and fused_available(x, weight)
    )


def can_fuse_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        residual.shape == x.shape
        and residual.dtype == x.dtype
        and can_fuse_rms_norm(x, weight)
        and fused_available(residual, weight)
    )


def can_fuse_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if x.dim() != 3 or x.shape[-1] % 2 or x.stride(-1) != 1:
        return False
    table = (x.shape[0], x.shape[2])
    return (
        tuple(cos.shape) == table
        and tuple(sin.shape) == table
        and cos.dtype == sin.dtype
        and fused_available(x, cos, sin)
    )


def can_fuse_silu_and_mul(x: torch.Tensor) -> bool:
    return x.dim() >= 1 and x.shape[-1] % 2 == 0 and fused_available(x)


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x [..., hidden]`, `weight [hidden]` -> `[..., hidden]` in `promote(weight, x)` (Triton)."""
    if not can_fuse_rms_norm(x, weight):
        raise ValueError(_unsupported("rms_norm", x, weight))
    return _rms_norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual), x + residual)`, the sum rounded to x.dtype (Triton).

    x, residual: [..., hidden] of one dtype; weight: [hidden].
    """
    if not can_fuse_add_rms_norm(x, residual, weight):
        raise ValueError(_unsupported("add_rms_norm", x, residual, weight))
    normed, new_residual = _rms_norm(x, residual, weight, eps)
    return normed, new_residual


def apply_rotary(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim], last dim contiguous, any other strides
    cos: torch.Tensor,  # [num_tokens, head_dim], computes in this dtype
    sin: torch.Tensor,  # [num_tokens, head_dim], cos.dtype
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim] x.dtype; may be x
) -> torch.Tensor:
    """Rotate-half RoPE of `x` by `cos` / `sin` (Triton), into `out` (new if None) in x.dtype.

    `out=x` rotates in place: each program reads its elements before it writes them.
    """
    if not can_fuse_rotary(x, cos, sin):
        raise ValueError(_unsupported("apply_rotary", x, cos, sin))
    num_tokens, num_heads, head_dim = x.shape
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be {list(x.shape)} {x.dtype} with a contiguous last dim, got "
            f"{list(out.shape)} {out.dtype} strides {out.stride()}"
        )
    if out.numel() == 0:
        return out
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _kernels().rotary[grid](
        x,
        cos,
        sin,
        out,
        num_heads,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        sin.stride(0),
        out.stride(0),
        out.stride(1),
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_h * block_d),
        enable_fp_fusion=False,
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`x [..., 2 * d]` (gate | up) -> `silu(gate) * up [..., d]` in x.dtype (Triton)."""
    if not can_fuse_silu_and_mul(x):
        raise ValueError(_unsupported("silu_and_mul", x))
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = _rows(x)
    block = min(_SILU_BLOCK, triton.next_power_of_2(d))
    grid = (rows.shape[0], triton.cdiv(d, block))
    _kernels().silu_and_mul[grid](
        rows,
        out,
        rows.stride(0),
        d,
        BLOCK=block,
        USE_LIBDEVICE=not _interpret(),
        num_warps=_num_warps(block),
        enable_fp_fusion=True,  # NOTE: as nvcc builds torch's SiLU; see the module docstring
    )
    return out


def _rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    new_residual = None
    if residual is not None:
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out, new_residual
    x_rows = _rows(x)
    num_rows = x_rows.shape[0]
    # NOTE: without a residual the kernel reads and writes neither; any pointer will do.
    res_rows = _rows(residual) if residual is not None else x_rows
    res_out = new_residual if new_residual is not None else out
    block_n = triton.next_power_of_2(hidden)
    block_m = max(1, _ELEMS_PER_PROGRAM // block_n)
    _kernels().rms_norm[(triton.cdiv(num_rows, block_m),)](
        x_rows,
        res_rows,
        _last_dim_contiguous(weight),
        out,
        res_out,
        num_rows,
        hidden,
        x_rows.stride(0),
        res_rows.stride(0),
        _mean_factor(num_rows, hidden),
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=_num_warps(block_m * block_n),
        enable_fp_fusion=False,
    )
    return out, new_residual


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x [..., n]` as `[rows, n]` with a contiguous last dim: a view when strides allow."""
    rows = x.reshape(-1, x.shape[-1])
    return _last_dim_contiguous(rows)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _mean_factor(num_rows: int, hidden: int) -> float:
    """The float32 factor torch's CUDA `mean` multiplies a row's sum by.

    `float(num_outputs) / numel` in float32 (`mean_kernel_impl`); 1 / hidden rounded once, unless
    `num_rows * hidden` has more than 24 significant bits.
    """
    return _to_float32(_to_float32(num_rows) / _to_float32(num_rows * hidden))


def _num_warps(num_elements: int) -> int:
    # NOTE: memory-bound kernels; about 8 elements a thread, from 1 to 16 warps.
    return max(1, min(16, num_elements // 256))


def _unsupported(name: str, *tensors: torch.Tensor) -> str:
    described = ", ".join(f"{list(t.shape)} {t.dtype} on {t.device}" for t in tensors)
    return f"{name} cannot take {described} (see vlmx.ops.fused.can_fuse_*)"


class _Kernels(NamedTuple):
    rms_norm: object
    rotary: object
    silu_and_mul: object


@functools.cache
def _kernels() -> _Kernels:
    # NOTE: wrapped on first use, not at import, where Triton may be missing.
    return _Kernels(
        # NOTE: the row count is not specialised on (== 1, % 16), so that a step's token count
        # never compiles a new variant mid-run (each compile costs a fraction of a second).
        triton.jit(_rms_norm_kernel, do_not_specialize=["num_rows"]),
        triton.jit(_rotary_kernel),
        triton.jit(_silu_and_mul_kernel),
    )


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions, wrapped by `_kernels`)
# ---------------------------------------------------------------------------------------------


def _rms_norm_kernel(
    x_ptr,  # [num_rows, hidden] rows at stride_x, last dim contiguous
    res_ptr,  # [num_rows, hidden] residual at stride_res (unread without HAS_RESIDUAL)
    w_ptr,  # [hidden]
    out_ptr,  # [num_rows, hidden] contiguous, promote(weight, x) dtype
    res_out_ptr,  # [num_rows, hidden] contiguous, x dtype: x + residual (HAS_RESIDUAL)
    num_rows,
    hidden,
    stride_x,
    stride_res,
    mean_factor,  # float32, see _mean_factor
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    mask = (rows < num_rows)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    out_offs = rows[:, None] * hidden + cols[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        summed = (x + r.to(tl.float32)).to(dtype)  # torch's add: float32 sum, rounded
        tl.store(res_out_ptr + out_offs, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, axis=1) * mean_factor
    y = x * tl.math.rsqrt(variance + eps)[:, None]
    y = y.to(dtype).to(tl.float32)  # RMSNorm rounds before the weight
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, (w[None, :] * y).to(out_ptr.dtype.element_ty), mask=mask)


def _rotary_kernel(
    x_ptr,  # [num_tokens, num_heads, 2 * HALF] at (stride_xt, stride_xh, 1)
    cos_ptr,  # [num_tokens, 2 * HALF] at (stride_ct, 1): its dtype is the compute dtype
    sin_ptr,  # [num_tokens, 2 * HALF] at (stride_st, 1)
    out_ptr,  # [num_tokens, num_heads, 2 * HALF] at (stride_ot, stride_oh, 1), x's dtype
    num_heads,
    stride_xt,
    stride_xh,
    stride_ct,
    stride_st,
    stride_ot,
    stride_oh,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HALF
    mask = (heads < num_heads)[:, None] & dim_ok[None, :]
    compute = cos_ptr.dtype.element_ty
    cos_row = cos_ptr + token * stride_ct + dims
    sin_row = sin_ptr + token * stride_st + dims
    c1 = tl.load(cos_row, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_row + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_row, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    src = x_ptr + token * stride_xt + heads[:, None] * stride_xh + dims[None, :]
    x1 = _round(tl.load(src, mask=mask, other=0.0).to(tl.float32), compute)  # x.to(cos.dtype)
    x2 = _round(tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32), compute)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): each product, then the sum,
    # rounded to the compute dtype, as torch's elementwise ops do.
    out1 = _round(_round(x1 * c1, compute) + _round(-x2 * s1, compute), compute)
    out2 = _round(_round(x2 * c2, compute) + _round(x1 * s2, compute), compute)
    dst = out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    out_dtype = out_ptr.dtype.element_ty
    tl.store(dst, out1.to(out_dtype), mask=mask)
    tl.store(dst + HALF, out2.to(out_dtype), mask=mask)


def _silu_and_mul_kernel(
    x_ptr,  # [num_rows, 2 * d] rows at stride_x, last dim contiguous: gate | up
    out_ptr,  # [num_rows, d] contiguous, x's dtype
    stride_x,
    d,
    BLOCK: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,  # False under the interpreter, which has no libdevice
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    src = x_ptr + row * stride_x + cols
    gate = tl.load(src, mask=mask, other=0.0)
    dtype = gate.dtype
    gate = gate.to(tl.float32)
    up = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    # torch's silu: x / (1 + expf(-x)) in float32 with IEEE division, rounded to x's dtype; the
    # `1 +` fuses with expf's last multiply, as in torch (enable_fp_fusion=True).
    e = libdevice.exp(-gate) if USE_LIBDEVICE else tl.exp(-gate)  # static: one is compiled
    silu = tl.math.div_rn(gate, 1.0 + e).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * d + cols, (silu * up).to(dtype), mask=mask)


def _round(value, dtype: tl.constexpr):
    """float32 `value` rounded to `dtype` (nearest even) and widened back; float32: unchanged."""
    return value.to(dtype).to(tl.float32)


# NOTE: a helper the kernels call must be a JIT function when they compile; without Triton
# it stays a plain function, never called.
if triton is not None:
    _round = triton.jit(_round)
