"""Fused Triton kernels (RMSNorm, residual add + RMSNorm, rotary, SiLU-and-mul) against the torch
references in `vlmx.layers`, which they must reproduce bit for bit where float32 arithmetic order
allows.

Without a GPU the kernels run in Triton's CPU interpreter, switched on (`TRITON_INTERPRET=1`)
before anything imports `triton.language`; so, as in `test_ops_paged_attention.py`, the
`*_in_interpreter` tests run in one child pytest started with the variable set
(`test_interpreter_tests_in_a_subprocess`) and skip in this process.

What the interpreter cannot check, and how the tests deal with it:

- Its float32 -> bfloat16 conversion truncates (Triton 3.8) where the GPU rounds to nearest
  even; the child process patches that conversion (`_round_bf16_to_nearest_even`) so that the
  bfloat16 tests check the kernels' order of roundings.
- Its `exp` is numpy's, not the GPU's `__nv_expf` that both torch and the kernel use on CUDA,
  and torch's CPU SiLU is computed another way than its CUDA one: SiLU must equal torch's CUDA
  formula evaluated with numpy's exp, and torch's CPU result to a few float32 ulps (one ulp on
  few elements once rounded to 16 bits; a missing rounding would change about a quarter).
- RMSNorm's sum of squares is reduced in another order than torch's, and torch's CPU `mean`
  divides where its CUDA kernel (which the kernel follows) multiplies by 1 / hidden: exact
  equality is required where every sum is exact (small integers, power-of-two widths), one ulp
  elsewhere. The CUDA tests repeat these checks at real sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triton_interpreter import (
    CUDA,
    HAS_TRITON,
    INTERPRETER,
    assert_runs_without_triton,
    in_interpreter,
    run_interpreter_tests,
)

from vlmx.layers import activation, norm, rotary
from vlmx.layers.activation import silu_and_mul_torch
from vlmx.layers.norm import add_rms_norm_torch, rms_norm_torch
from vlmx.layers.rotary import apply_rotary_torch
from vlmx.ops import fused

HALF_DTYPES = [torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float32, *HALF_DTYPES]
EPS = 1e-6


def _round_bf16_to_nearest_even() -> None:
    """Make the interpreter's float32 -> bfloat16 conversion round to nearest even, as the GPU's
    `cvt.rn.bf16.f32` does (Triton 3.8's interpreter drops the low bits)."""
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter._convert_float

    def convert(data, src_dtype, dst_dtype, rounding_mode):
        if src_dtype == tl.float32 and dst_dtype == tl.bfloat16:
            values = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return truncating(data, src_dtype, dst_dtype, rounding_mode)

    interpreter._convert_float = convert


if INTERPRETER and HAS_TRITON:
    _round_bf16_to_nearest_even()


@pytest.mark.skipif(INTERPRETER or not HAS_TRITON, reason="interpreter run, or no triton")
def test_interpreter_tests_in_a_subprocess():
    run_interpreter_tests(__file__)


# --- helpers ------------------------------------------------------------------------------------


def ulps_apart(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place of the (common) dtype; +0 == -0."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_dtype = {
        torch.float32: torch.int32,
        torch.bfloat16: torch.int16,
        torch.float16: torch.int16,
    }
    magnitude = {torch.float32: 0x7FFFFFFF, torch.bfloat16: 0x7FFF, torch.float16: 0x7FFF}

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.cpu().view(int_dtype[t.dtype]).long()
        return torch.where(bits < 0, -(bits & magnitude[t.dtype]), bits)

    return (ordered(actual) - ordered(expected)).abs()


def assert_near_exact(
    actual: torch.Tensor, expected: torch.Tensor, max_ulps: int = 1, max_fraction: float = 0.01
) -> None:
    """At most `max_ulps` apart everywhere, and at most `max_fraction` of elements differing."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.numel() == 0:
        return
    apart = ulps_apart(actual, expected)
    assert apart.max().item() <= max_ulps, f"{apart.max().item()} ulps apart"
    differing = (apart > 0).float().mean().item()
    assert differing <= max_fraction, f"{differing:.2%} of elements differ"


def small_integers(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """Multiples of 1/8 in [-2, 2]: their squares, and any sum of a few thousand of them, are
    exact in float32, so the sum of squares does not depend on the order of the reduction."""
    return (torch.randint(-16, 17, shape, generator=gen) / 8).to(dtype)


def norm_weight(hidden: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype)


def rotary_tables(
    num_tokens: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator, repeat: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_tokens, head_dim]: angles repeated over the halves (rotate-half layout), or
    with `repeat=False` two unrelated halves (the kernel must not assume they match)."""
    width = head_dim // 2 if repeat else head_dim
    angles = torch.rand(num_tokens, width, generator=gen) * 100
    if repeat:
        angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def qkv_view(
    num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, qkv): q a [num_tokens, num_heads, head_dim] view of the fused qkv rows, token stride
    3 * num_heads * head_dim, as the vision attention's `qkv(x).view(...).unbind(1)` gives."""
    qkv = torch.randn(num_tokens, 3, num_heads, head_dim, generator=gen).to(dtype)
    return qkv[:, 0], qkv


# --- RMSNorm ------------------------------------------------------------------------------------


@in_interpreter
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
@pytest.mark.parametrize("hidden", [128, 2048])
def test_rms_norm_exact_in_interpreter(dtype, weight_dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    weight_dtype = dtype if weight_dtype == "same" else weight_dtype
    x = small_integers((5, hidden), dtype, gen)
    x[3] = 0  # an all-zero row: rsqrt(eps)
    weight = norm_weight(hidden, weight_dtype, gen)
    out = fused.rms_norm(x, weight, EPS)
    expected = rms_norm_torch(x, weight, EPS)
    assert out.dtype == expected.dtype == torch.promote_types(weight_dtype, dtype)
    assert torch.equal(out, expected)


@in_interpreter
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(("num_rows", "hidden"), [(0, 1280), (1, 80), (33, 80), (3, 3420)])
def test_rms_norm_odd_sizes_in_interpreter(dtype, num_rows, hidden):
    gen = torch.Generator().manual_seed(num_rows)
    x = (3 * torch.randn(num_rows, hidden, generator=gen)).to(dtype)
    weight = norm_weight(hidden, dtype, gen)
    out = fused.rms_norm(x, weight, EPS)
    # NOTE: the sums of squares are reduced in another order (and torch's CPU mean divides by
    # hidden), so a float32 output may move by a few ulps, a rounded one rarely by one.
    if dtype == torch.float32:
        assert_near_exact(out, rms_norm_torch(x, weight, EPS), max_ulps=4, max_fraction=1.0)
    else:
        assert_near_exact(out, rms_norm_torch(x, weight, EPS), max_fraction=0.01)


@in_interpreter
def test_rms_norm_strided_and_batched_rows_in_interpreter():
    gen = torch.Generator().manual_seed(1)
    weight = norm_weight(64, torch.bfloat16, gen)
    # q of a fused [b, n, 3 * dim] projection (InternViT's qk norm): rows at a stride of 192
    qkv = small_integers((2, 3, 192), torch.bfloat16, gen)
    q = qkv[..., :64]
    assert torch.equal(fused.rms_norm(q, weight, EPS), rms_norm_torch(q, weight, EPS))
    # a last dim that is not contiguous is copied first
    xt = small_integers((64, 6), torch.bfloat16, gen).t()
    assert torch.equal(fused.rms_norm(xt, weight, EPS), rms_norm_torch(xt, weight, EPS))


@in_interpreter
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_add_rms_norm_in_interpreter(dtype):
    gen = torch.Generator().manual_seed(2)
    weight = norm_weight(256, dtype, gen)
    # exact sums of squares: both outputs equal
    x, residual = small_integers((6, 256), dtype, gen), small_integers((6, 256), dtype, gen)
    normed, new_residual = fused.add_rms_norm(x, residual, weight, EPS)
    expected_normed, expected_residual = add_rms_norm_torch(x, residual, weight, EPS)
    assert torch.equal(new_residual, expected_residual)
    assert torch.equal(normed, expected_normed)
    # random values: the sum rounds as torch's add does; the norm to an ulp (reduction order)
    x = torch.randn(7, 3, 1280, generator=gen).to(dtype)
    residual = (4 * torch.randn(7, 3, 1280, generator=gen)).to(dtype)
    weight = norm_weight(1280, dtype, gen)
    normed, new_residual = fused.add_rms_norm(x, residual, weight, EPS)
    expected_normed, expected_residual = add_rms_norm_torch(x, residual, weight, EPS)
    assert torch.equal(new_residual, expected_residual)
    if dtype == torch.float32:
        assert_near_exact(normed, expected_normed, max_ulps=4, max_fraction=1.0)
    else:
        assert_near_exact(normed, expected_normed, max_fraction=0.01)
    # no rows
    empty = torch.empty(0, 256, dtype=dtype)
    normed, new_residual = fused.add_rms_norm(empty, empty, weight[:256], EPS)
    assert normed.shape == new_residual.shape == (0, 256)


# --- rotary -------------------------------------------------------------------------------------

ROTARY_DTYPES = [  # (x dtype, table dtype): vision towers use float32 tables, decoders x's dtype
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),  # x rounded to the table dtype first
    (torch.float16, torch.bfloat16),
]


@in_interpreter
@pytest.mark.parametrize(("dtype", "table_dtype"), ROTARY_DTYPES)
@pytest.mark.parametrize(("num_tokens", "num_heads", "head_dim"), [(6, 16, 80), (5, 3, 128)])
def test_rotary_exact_in_interpreter(dtype, table_dtype, num_tokens, num_heads, head_dim):
    gen = torch.Generator().manual_seed(num_heads)
    q, qkv = qkv_view(num_tokens, num_heads, head_dim, dtype, gen)
    cos, sin = rotary_tables(num_tokens, head_dim, table_dtype, gen)
    out = fused.apply_rotary(q, cos, sin)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, apply_rotary_torch(q, cos, sin))


@in_interpreter
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_and_unrelated_halves_in_interpreter(table_dtype):
    gen = torch.Generator().manual_seed(3)
    q, qkv = qkv_view(4, 2, 64, torch.bfloat16, gen)
    cos, sin = rotary_tables(4, 64, table_dtype, gen, repeat=False)
    before = qkv.clone()
    expected = apply_rotary_torch(q, cos, sin)
    assert fused.apply_rotary(q, cos, sin, out=q) is q
    assert torch.equal(q, expected)
    assert torch.equal(qkv[:, 1:], before[:, 1:])  # k and v untouched


@in_interpreter
def test_rotary_no_tokens_and_bad_shapes_in_interpreter():
    cos, sin = torch.empty(0, 80), torch.empty(0, 80)
    out = fused.apply_rotary(torch.empty(0, 16, 80, dtype=torch.bfloat16), cos, sin)
    assert out.shape == (0, 16, 80)
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="apply_rotary"):
        fused.apply_rotary(x, torch.randn(3, 6), torch.randn(3, 6))  # table width != head_dim
    with pytest.raises(ValueError, match="out must be"):
        fused.apply_rotary(x, torch.randn(3, 8), torch.randn(3, 8), out=torch.empty(3, 2, 4))


# --- SiLU and mul -------------------------------------------------------------------------------


def silu_and_mul_formula(x: torch.Tensor) -> torch.Tensor:
    """torch's CUDA arithmetic with numpy's exp (the interpreter's): `g / (1 + exp(-g))` in
    float32, rounded to x.dtype, times `up` in float32, rounded."""
    d = x.shape[-1] // 2
    gate = x[..., :d].float().numpy()
    silu = torch.from_numpy(gate / (np.float32(1) + np.exp(-gate))).to(x.dtype)
    return (silu.float() * x[..., d:].float()).to(x.dtype)


@in_interpreter
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(0, 128), (5, 600), (2, 3, 2 * 1100), (1, 2 * 3456)])
def test_silu_and_mul_in_interpreter(dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    out = fused.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert torch.equal(out, silu_and_mul_formula(x))
    # NOTE: torch's CPU SiLU is computed another way, up to 4 float32 ulps from the formula on
    # a sixth of the elements; rounded to 16 bits that rarely shows.
    if dtype == torch.float32:
        assert_near_exact(out, silu_and_mul_torch(x), max_ulps=8, max_fraction=1.0)
    else:
        assert_near_exact(out, silu_and_mul_torch(x), max_fraction=0.01)


@in_interpreter
def test_silu_and_mul_strided_rows_in_interpreter():
    gen = torch.Generator().manual_seed(4)
    wide = (3 * torch.randn(9, 700, generator=gen)).to(torch.bfloat16)
    x = wide[:, :600]  # row stride 700
    assert torch.equal(fused.silu_and_mul(x), silu_and_mul_formula(x))


# --- dispatch from the layers -------------------------------------------------------------------


@in_interpreter
def test_layers_take_the_fused_path_in_interpreter(monkeypatch):
    calls = []
    for name in ("rms_norm", "add_rms_norm", "apply_rotary", "silu_and_mul"):
        real = getattr(fused, name)
        monkeypatch.setattr(
            fused, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    gen = torch.Generator().manual_seed(5)
    x = small_integers((3, 64), torch.bfloat16, gen)
    layer = norm.RMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), rms_norm_torch(x, layer.weight, layer.eps))
        norm.add_rms_norm(x, x, layer.weight, layer.eps)
    q, _ = qkv_view(3, 2, 16, torch.bfloat16, gen)
    cos, sin = rotary_tables(3, 16, torch.float32, gen)
    assert torch.equal(rotary.apply_rotary(q, cos, sin), apply_rotary_torch(q, cos, sin))
    activation.silu_and_mul(x)
    assert calls == ["rms_norm", "add_rms_norm", "apply_rotary", "silu_and_mul"]
    # a weight that needs its gradient, with grad on: the torch path
    assert not fused.can_fuse_rms_norm(x, layer.weight)
    layer(x)
    assert len(calls) == 4


@in_interpreter
def test_vision_attention_rotates_q_and_k_in_place_in_interpreter(monkeypatch):
    """The vision attention rotates q and k inside its qkv output in one launch, and attends
    over the strided views; the result equals rotating copies of them on the torch path."""
    from vlmx.layers.vision import VisionAttention

    gen = torch.Generator().manual_seed(6)
    attn = VisionAttention(64, 4).to(torch.bfloat16)
    with torch.no_grad():
        for param in attn.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    x = torch.randn(21, 64, generator=gen).to(torch.bfloat16)
    cos, sin = rotary_tables(21, 16, torch.float32, gen)
    calls = []
    real = fused.apply_rotary
    monkeypatch.setattr(fused, "apply_rotary", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.no_grad():
        in_place = attn(x, cos, sin, [0, 9, 21])
        assert len(calls) == 1 and "out" in calls[0]
        monkeypatch.setattr(fused, "can_fuse_rotary", lambda *a: False)
        apart = attn(x, cos, sin, [0, 9, 21])
    assert len(calls) == 1
    assert torch.equal(in_place, apart)


def test_layers_use_torch_without_a_device(monkeypatch):
    """CPU tensors outside the interpreter never reach a kernel."""

    def refuse(*args, **kwargs):
        raise AssertionError("a fused kernel was called")

    for name in ("rms_norm", "add_rms_norm", "apply_rotary", "silu_and_mul"):
        monkeypatch.setattr(fused, name, refuse)
    if INTERPRETER:
        pytest.skip("the interpreter makes CPU tensors a device")
    x = torch.randn(3, 2, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(norm.RMSNorm(16).to(torch.bfloat16)(x), rms_norm_torch(x, 1.0, EPS))
        norm.add_rms_norm(x, x, torch.ones(16), EPS)
    rotary.apply_rotary(x, torch.randn(3, 16), torch.randn(3, 16))
    activation.silu_and_mul(x)


def test_mean_factor_follows_torch_cuda_mean():
    """torch's CUDA mean multiplies by float(rows) / float(rows * hidden), in float32."""
    f32 = np.float32
    assert fused._mean_factor(65536, 1280) == float(f32(1) / f32(1280))
    assert fused._mean_factor(7, 2048) == 2.0**-11
    rows, hidden = 40001, 3420  # rows * hidden needs more than 24 bits: rounded before dividing
    assert fused._mean_factor(rows, hidden) == float(f32(rows) / f32(rows * hidden))


@pytest.mark.skipif(INTERPRETER or not HAS_TRITON, reason="interpreter run, or no triton")
def test_kernels_compile_for_hopper_with_torchs_arithmetic():
    """Compiled for sm_90 (no GPU needed): the instructions that decide the rounding."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def ptx(kernel, args: dict[str, str], constexprs: dict[str, object], fusion: bool) -> str:
        signature = {**args, **dict.fromkeys(constexprs, "constexpr")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        options = {"num_warps": 4, "enable_fp_fusion": fusion}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    kernels = fused._kernels()
    norm_args = dict.fromkeys(["x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr"], "*bf16")
    norm_args |= dict.fromkeys(["num_rows", "hidden", "stride_x", "stride_res"], "i32")
    norm_args |= {"mean_factor": "fp32", "eps": "fp32"}
    norm_ptx = ptx(
        kernels.rms_norm, norm_args, {"HAS_RESIDUAL": True, "BLOCK_M": 1, "BLOCK_N": 2048}, False
    )
    assert "rsqrt.approx" in norm_ptx and "fma" not in norm_ptx  # squares rounded before the sum
    rotary_args = {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16"}
    rotary_args |= dict.fromkeys(
        ["num_heads", "stride_xt", "stride_xh", "stride_ct", "stride_st", "stride_ot", "stride_oh"],
        "i32",
    )
    rotary_ptx = ptx(kernels.rotary, rotary_args, {"HALF": 40, "BLOCK_H": 16, "BLOCK_D": 64}, False)
    assert "mul.rn.f32" in rotary_ptx and "fma" not in rotary_ptx  # products rounded
    silu_args = {"x_ptr": "*bf16", "out_ptr": "*bf16", "stride_x": "i32", "d": "i32"}
    silu_ptx = ptx(kernels.silu_and_mul, silu_args, {"BLOCK": 1024, "USE_LIBDEVICE": True}, True)
    assert "div.rn.f32" in silu_ptx  # IEEE division, as torch's `/`
    assert "ex2.approx" in silu_ptx and "fma.rm" in silu_ptx  # libdevice expf, not tl.exp


def test_module_imports_without_triton():
    assert_runs_without_triton(
        "import torch\n"
        "from vlmx.ops import fused\n"
        "from vlmx.layers.norm import RMSNorm\n"
        "from vlmx.layers.activation import silu_and_mul\n"
        "x = torch.randn(2, 8)\n"
        "assert not fused.fused_available(x) and not fused.can_fuse_rms_norm(x, torch.ones(8))\n"
        "assert RMSNorm(8)(x).shape == (2, 8) and silu_and_mul(x).shape == (2, 4)\n"
    )


# --- CUDA (compiled kernels; skipped without a GPU) ---------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_rms_norm_exact_sums_on_cuda(dtype):
    """Where the sum of squares is exact in any order, every element equals torch's."""
    gen = torch.Generator().manual_seed(0)
    x = small_integers((65536, 1280), dtype, gen).cuda()
    for weight_dtype in (dtype, torch.float32):
        weight = norm_weight(1280, weight_dtype, gen).cuda()
        assert torch.equal(fused.rms_norm(x, weight, EPS), rms_norm_torch(x, weight, EPS))


@CUDA
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(("num_rows", "hidden"), [(65536, 1280), (8192, 2048), (4099, 3584)])
def test_rms_norm_matches_torch_on_cuda(dtype, num_rows, hidden):
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(num_rows, hidden, generator=gen)).to(dtype).cuda()
    weight = norm_weight(hidden, dtype, gen).cuda()
    out = fused.rms_norm(x, weight, EPS)
    # NOTE: torch reduces the squares in another order; a row's variance can move by an ulp of
    # float32, the normalised element (rounded to the dtype) by one ulp, and the product with
    # the weight, rounded again, by up to two (seen on an H200). On the CPU, with a second
    # summation order, 2e-6 of bf16 and 2e-5 of fp16 elements moved. A missing rounding would
    # move ~10%.
    assert_near_exact(out, rms_norm_torch(x, weight, EPS), max_ulps=2, max_fraction=5e-4)


@CUDA
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_add_rms_norm_matches_torch_on_cuda(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8192, 2048, generator=gen).to(dtype).cuda()
    residual = (4 * torch.randn(8192, 2048, generator=gen)).to(dtype).cuda()
    weight = norm_weight(2048, dtype, gen).cuda()
    normed, new_residual = fused.add_rms_norm(x, residual, weight, EPS)
    expected_normed, expected_residual = add_rms_norm_torch(x, residual, weight, EPS)
    assert torch.equal(new_residual, expected_residual)
    # reduction order, as above
    assert_near_exact(normed, expected_normed, max_ulps=2, max_fraction=5e-4)


@CUDA
@pytest.mark.parametrize(
    ("num_heads", "head_dim", "dtype", "table_dtype"),
    [
        (16, 80, torch.bfloat16, torch.float32),  # Qwen2.5-VL vision tower
        (16, 128, torch.bfloat16, torch.bfloat16),  # Qwen2.5-VL-3B decoder
        (16, 128, torch.float16, torch.float16),
        (16, 80, torch.float16, torch.float32),
    ],
)
def test_rotary_exact_on_cuda(num_heads, head_dim, dtype, table_dtype):
    gen = torch.Generator().manual_seed(3)
    qkv = qkv_view(8192, num_heads, head_dim, dtype, gen)[1].cuda()
    q = qkv[:, 0]  # [8192, num_heads, head_dim] at a token stride of 3 * num_heads * head_dim
    cos, sin = (t.cuda() for t in rotary_tables(8192, head_dim, table_dtype, gen))
    expected = apply_rotary_torch(q, cos, sin)
    assert torch.equal(fused.apply_rotary(q, cos, sin), expected)
    fused.apply_rotary(q, cos, sin, out=q)
    assert torch.equal(q, expected)


@CUDA
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(8192, 2 * 11008), (4096, 2 * 3456)])
def test_silu_and_mul_exact_on_cuda(dtype, shape):
    gen = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(shape, generator=gen)).to(dtype).cuda()
    assert torch.equal(fused.silu_and_mul(x), silu_and_mul_torch(x))


@CUDA
def test_fused_ops_replay_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 1024, generator=gen).to(torch.bfloat16).cuda()
    weight = norm_weight(1024, torch.bfloat16, gen).cuda()
    q = torch.randn(64, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    cos, sin = (t.cuda() for t in rotary_tables(64, 128, torch.bfloat16, gen))
    gate_up = torch.randn(64, 2 * 1024, generator=gen).to(torch.bfloat16).cuda()

    def step() -> tuple[torch.Tensor, ...]:
        normed = fused.rms_norm(x, weight, EPS)
        return normed, fused.apply_rotary(q, cos, sin), fused.silu_and_mul(gate_up)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (x, q, gate_up):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for out, exp in zip(outs, expected):
        assert torch.equal(out, exp)
