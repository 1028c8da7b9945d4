"""The batched LoRA kernels (shrink, expand) against the torch reference, and the reference
against a per-token loop.

The Triton kernels run under Triton's CPU interpreter in a child pytest
(`test_interpreter_tests_in_a_subprocess`, see tests/triton_interpreter.py), or on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triton_interpreter import CUDA, HAS_TRITON, INTERPRETER, in_interpreter, run_interpreter_tests

from vlmx.ops import lora as ops

# (row offset, rows) of each part: q | k | v; gate | up with padding rows between; one part
SLICES = {
    "qkv": ((0, 32), (32, 16), (48, 16)),
    "padded": ((0, 24), (32, 24)),
    "one": ((0, 40),),
    "wide": ((0, 300), (320, 200)),  # several output column blocks
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.mark.skipif(INTERPRETER or not HAS_TRITON, reason="interpreter run, or no triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests run the kernels")
def test_interpreter_tests_in_a_subprocess():
    run_interpreter_tests(__file__)


def make_case(num_tokens, in_features, slices, rank, num_slots, seed, dtype, device):
    gen = torch.Generator().manual_seed(seed)
    out = max(o + s for o, s in slices) + 8  # rows past the last part stay untouched

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x = rand(num_tokens, in_features)
    y = rand(num_tokens, out)
    a = rand(num_slots, len(slices) * rank, in_features)
    b = rand(num_slots, out, rank)
    rng = np.random.default_rng(seed)
    token_slots = rng.integers(-1, num_slots - 1, num_tokens)  # the last slot is unused
    return x, y, a, b, token_slots


def groups_of(token_slots, num_slots, device, pad: int = 0) -> ops.LoRATokenGroups:
    """The groups as the runner builds them; `pad` extra token indexes (persistent buffers)."""
    order, starts, counts = ops.group_tokens(token_slots, num_slots)
    rows = torch.from_numpy(order.astype(np.int64)).to(device)
    return ops.LoRATokenGroups(
        token_idx=torch.cat([rows, torch.zeros(pad, dtype=torch.long, device=device)]).int(),
        starts=torch.from_numpy(starts).to(device),
        counts=torch.from_numpy(counts).to(device),
        rows_by_slot=[(s, rows[starts[s] : starts[s] + counts[s]]) for s in range(num_slots)],
    )


def test_reference_matches_a_per_token_loop():
    slices = SLICES["qkv"]
    x, y, a, b, token_slots = make_case(13, 24, slices, 4, 3, 0, torch.float64, "cpu")
    expected = y.clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        for i, (offset, size) in enumerate(slices):
            t_i = a[slot, i * 4 : (i + 1) * 4] @ x[t]  # [R]
            expected[t, offset : offset + size] += b[slot, offset : offset + size] @ t_i
    ops.lora_apply_torch(x, y, a, b, slices, groups_of(token_slots, 3, "cpu").rows_by_slot)
    torch.testing.assert_close(y, expected)


def _check_triton(name, num_tokens, in_features, rank, dtype, device):
    slices = SLICES[name]
    x, y, a, b, token_slots = make_case(num_tokens, in_features, slices, rank, 3, 1, dtype, device)
    groups = groups_of(token_slots, 3, device, pad=5)
    expected = y.clone()
    ops.lora_apply_torch(x, expected, a, b, slices, groups.rows_by_slot)
    table = torch.tensor(slices, dtype=torch.int32, device=device)
    ops.lora_apply_triton(x, y, a, b, slices, table, groups)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, expected, atol=tol * max(1, rank * in_features) ** 0.5, rtol=tol)


@in_interpreter
@pytest.mark.parametrize(
    ("name", "num_tokens", "in_features", "rank", "tuning"),
    [
        ("qkv", 21, 40, 8, {}),  # K under one block
        ("padded", 5, 2048, 16, {}),  # split-K over 8 chunks, padding rows between parts
        ("one", 17, 24, 20, {}),  # a rank under a power of two
        ("qkv", 37, 1000, 16, {}),  # K not a multiple of the chunk: a ragged last chunk
        ("qkv", 19, 300, 48, {}),  # 3 * 48 = 144 shrink columns: two column blocks
        # few programs wanted: 2 K chunks, 2 column blocks a program
        ("wide", 40, 1000, 16, {"_TARGET_PROGRAMS": 8}),
        # the expand loads the partial planes 2 at a time: 8 planes; 3 planes (one masked)
        ("padded", 5, 2048, 16, {"_MAX_PARTIALS_A_LOAD": 512}),
        ("qkv", 37, 700, 16, {"_MAX_PARTIALS_A_LOAD": 512}),
    ],
)
def test_triton_matches_reference_in_interpreter(
    name, num_tokens, in_features, rank, tuning, monkeypatch
):
    """Masked ragged tiles, uneven slot groups (one slot unused, tokens of none), split-K,
    expand programs over several column blocks and several loads of partial planes."""
    for knob, value in tuning.items():
        monkeypatch.setattr(ops, knob, value)
    _check_triton(name, num_tokens, in_features, rank, torch.float32, "cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_planes_a_load_is_a_power_of_two_within_the_limit():
    assert ops._planes_a_load(8, 16 * 16) == 8  # a decode step: every plane at once
    assert ops._planes_a_load(15, 16 * 16) == 16  # masked past 15
    assert ops._planes_a_load(16, 64 * 64) == 2  # 2 * 4096 = the limit
    assert ops._planes_a_load(4, 64 * 256) == 1  # one plane over the limit: one at a time


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
@pytest.mark.parametrize(("num_tokens", "in_features"), [(256, 2048), (256, 11008), (8192, 2048)])
def test_split_k_covers_k_with_enough_programs(num_tokens, in_features):
    """The K chunks tile K exactly (the last may be ragged, none empty), in BLOCK_K multiples; a
    decode step of 256 tokens gets over a hundred shrink programs."""
    m_blocks = -(-num_tokens // ops._block_m(num_tokens))
    split, chunk = ops._split_k(m_blocks, in_features)
    assert chunk % ops._SHRINK_BLOCK_K == 0
    assert (split - 1) * chunk < in_features <= split * chunk
    assert m_blocks * split >= 128


@CUDA
@pytest.mark.parametrize(
    ("name", "num_tokens", "in_features", "rank"),
    [
        ("qkv", 300, 2048, 16),
        ("padded", 7, 11008, 16),
        ("one", 2000, 2048, 64),
        ("wide", 256, 11008, 16),
        ("qkv", 256, 2048, 48),
    ],
)
def test_triton_matches_reference_on_cuda(name, num_tokens, in_features, rank):
    _check_triton(name, num_tokens, in_features, rank, torch.bfloat16, "cuda")


@in_interpreter
def test_engine_with_the_kernels_matches_the_torch_path_in_interpreter(qwen2_5_vl_ckpt, tmp_path):
    """A whole engine run with two adapters and the base model mixed, the LoRA layers through
    the Triton kernels (token groups in the persistent buffers, as on CUDA) and through the
    torch path: the same tokens and logprobs."""
    from vlmx import LLM, SamplingParams
    from vlmx.bench.lora import write_random_adapters

    loras = write_random_adapters(qwen2_5_vl_ckpt, 4, 2, str(tmp_path), std=0.3)
    llm = LLM(
        model=qwen2_5_vl_ckpt, dtype="float32", device="cpu", max_model_len=256,
        enable_lora=True, max_loras=2, max_lora_rank=4,
    )  # fmt: skip
    prompts = [{"prompt_token_ids": list(range(100, 124))}] * 3  # one prompt, three models
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2)

    def run():
        llm.reset_prefix_cache()
        return llm.generate(prompts, params, use_tqdm=False, lora_request=[*loras, None])

    torch_path = run()
    manager = llm.llm_engine.executor.runner.lora
    manager.batch.use_triton = True
    manager.allocate_token_buffers(256)
    kernels = run()
    answers = [out.outputs[0].token_ids for out in torch_path]
    assert answers[0] != answers[2] and answers[1] != answers[2]  # the adapters change them
    for ref, out in zip(torch_path, kernels):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for ref_lp, lp in zip(ref.outputs[0].logprobs, out.outputs[0].logprobs):
            for token_id, entry in ref_lp.items():
                assert abs(lp[token_id].logprob - entry.logprob) < 1e-4
