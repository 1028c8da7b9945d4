"""Triton KV store and paged decode attention against their torch references.

Without a GPU the kernels run in Triton's CPU interpreter, which must be switched on
(`TRITON_INTERPRET=1`) before anything imports `triton.language`: Triton wraps its own library
functions as compiled or interpreted at that import. So the `*_in_interpreter` tests run in one
child pytest started with the variable set (`test_interpreter_tests_in_a_subprocess`), and skip
in this process unless it was itself started under the interpreter; other test modules never
see the variable. The references are checked against dense attention over the unpaged keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import (
    CUDA,
    HAS_TRITON,
    INTERPRETER,
    assert_runs_without_triton,
    in_interpreter,
    run_interpreter_tests,
)

from vlmx.ops import paged_attention as ops

TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.skipif(INTERPRETER or not HAS_TRITON, reason="interpreter run, or no triton")
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="on a GPU the CUDA tests below run the kernels themselves (and Triton 3.6's "
    "interpreter, on the GPU machine, fails to launch grids given as shapes)",
)
def test_interpreter_tests_in_a_subprocess():
    run_interpreter_tests(__file__)


@dataclass(frozen=True)
class Case:
    query: torch.Tensor  # [batch, num_heads, head_dim], a strided view of a fused qkv row
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [batch, max_blocks] int32, -1 past each sequence
    seq_lens: torch.Tensor  # [batch] int32
    keys: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim], unpaged
    values: list[torch.Tensor]
    scale: float


def make_case(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    seq_lens: list[int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> Case:
    """Random sequences stored (by the torch reference) in shuffled blocks of a noisy cache."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(num_blocks_per_seq) + 2
    num_blocks = sum(num_blocks_per_seq) + 3
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    keys, values, slots = [], [], []
    for i, (n, nb) in enumerate(zip(seq_lens, num_blocks_per_seq)):
        block_tables[i, :nb] = torch.tensor(block_ids[:nb], dtype=torch.int32)
        block_ids = block_ids[nb:]
        pos = torch.arange(n)
        slots.append(block_tables[i, pos // block_size].long() * block_size + pos % block_size)
        keys.append(torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype))
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen).to(dtype)
    ops.store_kv_torch(torch.cat(keys), torch.cat(values), kv_cache, torch.cat(slots))
    qkv = torch.randn(len(seq_lens), (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    query = qkv.to(dtype)[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    return Case(
        query=query.to(device),
        kv_cache=kv_cache.to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        keys=[k.to(device) for k in keys],
        values=[v.to(device) for v in values],
        scale=1 / math.sqrt(head_dim),
    )


def dense_attention(case: Case, sliding_window: int | None = None) -> torch.Tensor:
    """SDPA in float64 over each sequence's unpaged keys; zeros for an empty sequence. With a
    window W the query (position n - 1) sees keys k > n - 1 - W (HF `sliding_window_overlay`)."""
    out = torch.zeros(case.query.shape, dtype=torch.float64)
    for i, (key, value) in enumerate(zip(case.keys, case.values)):
        if len(key) == 0:
            continue
        mask = None
        if sliding_window is not None:
            mask = torch.arange(len(key)) > len(key) - 1 - sliding_window  # [seq_len]
        out[i] = F.scaled_dot_product_attention(
            case.query[i, :, None].cpu().double(),  # [num_heads, 1, head_dim]
            key.transpose(0, 1).cpu().double(),  # [num_kv_heads, seq_len, head_dim]
            value.transpose(0, 1).cpu().double(),
            attn_mask=mask,
            scale=case.scale,
            enable_gqa=True,
        )[:, 0]
    return out


def run_kernel(case: Case, out: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    return ops.paged_decode_attention(
        case.query, case.kv_cache, case.block_tables, case.seq_lens, case.scale, out, **kwargs
    )


def run_reference(case: Case, sliding_window: int | None = None) -> torch.Tensor:
    return ops.paged_decode_attention_torch(
        case.query, case.kv_cache, case.block_tables, case.seq_lens, case.scale, sliding_window
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), atol=tol, rtol=tol)


# (num_heads, num_kv_heads, head_dim, block_size, seq_lens): GQA groups 2, 8 and 1; a padding
# row (seq_len 0) in each; lengths from one key to several 64-key tiles.
SHAPES = [
    (4, 2, 64, 16, [1, 0, 17, 150]),
    (8, 1, 128, 4, [5, 70, 0]),
    (4, 4, 128, 16, [33, 200, 16, 0, 64]),
    (4, 2, 80, 16, [40, 0, 100]),  # head_dim padded to 128 lanes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_matches_dense_attention(shape, dtype):
    case = make_case(*shape, dtype=dtype)
    assert_close(run_reference(case), dense_attention(case), dtype)


@in_interpreter
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_matches_reference_in_interpreter(shape, num_splits):
    case = make_case(*shape)
    out = run_kernel(case, num_splits=num_splits)
    assert_close(out, run_reference(case), torch.float32)
    padding = case.seq_lens == 0
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))


@in_interpreter
@pytest.mark.parametrize(
    ("dtype", "num_splits"), [(torch.bfloat16, 1), (torch.bfloat16, 2), (torch.float16, 1)]
)
def test_decode_half_precision_in_interpreter(dtype, num_splits):
    case = make_case(8, 2, 64, 16, [1, 90, 0, 130], dtype=dtype, seed=1)
    out = run_kernel(case, num_splits=num_splits)
    assert out.dtype == dtype
    assert_close(out, run_reference(case), dtype)


@in_interpreter
def test_decode_empty_and_default_splits_in_interpreter():
    # 16 splits over at most 3 tiles: most programs have an empty key range.
    case = make_case(4, 4, 64, 16, [3, 129, 0], seed=2)
    expected = run_reference(case)
    for num_splits in (16, None):
        out = run_kernel(case, num_splits=num_splits)
        assert_close(out, expected, torch.float32)


@in_interpreter
def test_decode_into_a_strided_out_in_interpreter():
    case = make_case(4, 2, 64, 16, [20, 7], seed=3)
    buffer = torch.full((2, 4, 2 * 64), 7.0)
    out = buffer[:, :, 64:]  # [2, 4, 64], strides (512, 128, 1)
    result = run_kernel(case, out, num_splits=2)
    assert result is out
    assert_close(out, run_reference(case), torch.float32)
    assert torch.equal(buffer[:, :, :64], torch.full((2, 4, 64), 7.0))


# (num_heads, num_kv_heads, head_dim, block_size, seq_lens, window): windows shorter than most
# sequences, starting mid-block (block boundaries inside the window), one longer than a tile, GQA
# groups 4 and 2, sequences shorter than the window and a padding row.
WINDOW_SHAPES = [
    (8, 2, 64, 16, [1, 0, 17, 150, 16], 16),
    (4, 2, 64, 4, [5, 70, 0, 9], 7),
    (8, 2, 128, 16, [33, 200, 300, 0], 90),
    (4, 4, 64, 16, [3, 129], 1),
]


@pytest.mark.parametrize("shape", WINDOW_SHAPES)
def test_windowed_reference_matches_dense_attention(shape):
    *dims, window = shape
    case = make_case(*dims)
    expected = dense_attention(case, window)
    assert_close(run_reference(case, window), expected, torch.float32)
    longest = max(dims[-1])
    assert not torch.allclose(expected, dense_attention(case))  # the window masks something
    assert_close(run_reference(case, longest), dense_attention(case), torch.float32)


@in_interpreter
@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("shape", WINDOW_SHAPES)
def test_windowed_decode_matches_reference_in_interpreter(shape, num_splits):
    *dims, window = shape
    case = make_case(*dims, seed=5)
    out = run_kernel(case, num_splits=num_splits, sliding_window=window)
    assert_close(out, run_reference(case, window), torch.float32)


@in_interpreter
def test_windowed_decode_half_precision_in_interpreter():
    case = make_case(8, 2, 64, 16, [1, 90, 0, 130], dtype=torch.bfloat16, seed=6)
    for num_splits in (1, 2):
        out = run_kernel(case, num_splits=num_splits, sliding_window=24)
        assert_close(out, run_reference(case, 24), torch.bfloat16)


def test_decode_rejects_bad_shapes():
    case = make_case(4, 2, 64, 16, [5])
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        ops.paged_decode_attention(
            case.query[:, :3], case.kv_cache, case.block_tables, case.seq_lens, 1.0
        )
    with pytest.raises(ValueError, match="out must be"):
        ops.paged_decode_attention(
            case.query,
            case.kv_cache,
            case.block_tables,
            case.seq_lens,
            1.0,
            torch.empty(1, 4, 32),
        )
    for window in (0, 2**31):
        with pytest.raises(ValueError, match="sliding_window must be"):
            run_reference(case, window)


def make_store_inputs(num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str = "cpu"):
    """Key / value as strided views of a fused qkv output, and slots with padding rows (-1)."""
    gen = torch.Generator().manual_seed(4)
    num_tokens, num_heads, num_blocks, block_size = 9, 2 * num_kv_heads, 6, 4
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(dtype).to(device)
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    key = qkv[:, q_end:k_end].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, k_end:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 4, 8]] = -1
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    return key, value, kv_cache, slots.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_reference_writes_valid_slots_only(dtype):
    key, value, kv_cache, slots = make_store_inputs(2, 64, dtype)
    before = kv_cache.clone()
    ops.store_kv_torch(key, value, kv_cache, slots)
    flat, flat_before = kv_cache.view(2, -1, 2, 64), before.view(2, -1, 2, 64)
    valid = slots >= 0
    assert torch.equal(flat[0, slots[valid]], key[valid])
    assert torch.equal(flat[1, slots[valid]], value[valid])
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots[valid]] = False
    assert torch.equal(flat[:, untouched], flat_before[:, untouched])


@in_interpreter
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(2, 64), (3, 80), (1, 128)])
def test_store_kv_matches_reference_in_interpreter(num_kv_heads, head_dim):
    key, value, kv_cache, slots = make_store_inputs(num_kv_heads, head_dim, torch.bfloat16)
    expected = kv_cache.clone()
    ops.store_kv_torch(key, value, expected, slots)
    ops.store_kv(key, value, kv_cache, slots)
    assert torch.equal(kv_cache, expected)
    ops.store_kv(key[:0], value[:0], kv_cache, slots[:0])  # no tokens: no launch
    assert torch.equal(kv_cache, expected)


def test_choose_num_splits_depends_on_shapes_only():
    # Qwen2.5-VL-3B: 2 KV heads; 132 SMs.
    assert ops.choose_num_splits(256, 2, 512, 16, 132) == 1  # 512 programs already
    assert ops.choose_num_splits(1, 2, 512, 16, 132) == 32  # 8192 keys: capped
    assert ops.choose_num_splits(1, 2, 13, 16, 132) == 1  # 208 keys: not worth a split
    assert ops.choose_num_splits(1, 2, 52, 16, 132) == 2  # 832 keys: 3 splits, rounded down
    assert ops.choose_num_splits(32, 2, 512, 16, 132) == 4  # ~2 programs per SM
    assert ops.choose_num_splits(128, 2, 512, 16, 132) == 2


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_available_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ops.triton_available(torch.device("cpu"))
    assert ops.triton_available("cuda") == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.triton_available("cpu")


def test_module_imports_without_triton():
    assert_runs_without_triton(
        "from vlmx.ops import paged_attention as ops\n"
        "assert not ops.triton_available('cpu') and not ops.triton_available('cuda')\n"
    )


# --- CUDA (compiled kernels; skipped without a GPU) --------------------------------------------


@CUDA
@pytest.mark.parametrize(
    ("batch", "num_heads", "num_kv_heads", "head_dim", "dtype"),
    [
        (1, 16, 2, 128, torch.bfloat16),  # Qwen2.5-VL-3B, many splits
        (8, 16, 2, 128, torch.bfloat16),
        (300, 16, 2, 128, torch.bfloat16),  # 600 programs: no split
        (5, 8, 8, 64, torch.float16),
        (3, 4, 2, 80, torch.bfloat16),
    ],
)
def test_decode_matches_reference_on_cuda(batch, num_heads, num_kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 2048, (batch,), generator=gen).tolist()
    if batch > 1:
        seq_lens[batch // 2] = 0  # a padding row
    case = make_case(num_heads, num_kv_heads, head_dim, 16, seq_lens, dtype=dtype, device="cuda")
    expected = run_reference(case)
    for num_splits in (None, 1, 7):
        out = run_kernel(case, num_splits=num_splits)
        assert_close(out, expected, dtype)
    for window in (1, 100, 4096):
        expected = run_reference(case, window)
        for num_splits in (None, 3):
            out = run_kernel(case, num_splits=num_splits, sliding_window=window)
            assert_close(out, expected, dtype)


@CUDA
def test_store_kv_matches_reference_on_cuda():
    key, value, kv_cache, slots = make_store_inputs(2, 128, torch.bfloat16, device="cuda")
    expected = kv_cache.clone()
    ops.store_kv_torch(key, value, expected, slots)
    ops.store_kv(key, value, kv_cache, slots)
    assert torch.equal(kv_cache, expected)


@CUDA
def test_decode_replays_in_a_cuda_graph_with_new_lengths():
    # Captured with one set of lengths and tables, replayed with another: nothing is baked in.
    first = make_case(16, 2, 128, 16, [300, 0, 1000, 5], dtype=torch.bfloat16, device="cuda")
    second = make_case(16, 2, 128, 16, [700, 17, 0, 1200], dtype=torch.bfloat16, device="cuda")
    max_blocks = max(first.block_tables.shape[1], second.block_tables.shape[1])
    num_blocks = max(first.kv_cache.shape[1], second.kv_cache.shape[1])
    kv_cache = torch.zeros(2, num_blocks, 16, 2, 128, dtype=torch.bfloat16, device="cuda")
    block_tables = torch.full((4, max_blocks), -1, dtype=torch.int32, device="cuda")
    seq_lens = torch.zeros(4, dtype=torch.int32, device="cuda")
    query = torch.empty_like(first.query)

    def load(case: Case) -> None:
        kv_cache.zero_()
        kv_cache[:, : case.kv_cache.shape[1]] = case.kv_cache
        block_tables.fill_(-1)
        block_tables[:, : case.block_tables.shape[1]] = case.block_tables
        seq_lens.copy_(case.seq_lens)
        query.copy_(case.query)

    def step() -> torch.Tensor:
        return ops.paged_decode_attention(query, kv_cache, block_tables, seq_lens, first.scale)

    load(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for case in (first, second):
        load(case)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, run_reference(case), torch.bfloat16)
