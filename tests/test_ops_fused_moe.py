"""The fused Triton MoE against the torch reference of `vlmx.layers.moe`.

Without a GPU the kernels run in Triton's CPU interpreter, in one child pytest started with
`TRITON_INTERPRET=1` (see tests/triton_interpreter.py and test_ops_paged_attention.py); the
`*_in_interpreter` tests skip in this process. Cases are small (the interpreter is slow): a few
experts, uneven routing, experts no token picks, one token, a hidden size that is no multiple
of the block.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import (
    CUDA,
    HAS_TRITON,
    INTERPRETER,
    in_interpreter,
    run_interpreter_tests,
)

from vlmx.layers.moe import MoEConfig, MoEMLP, moe_experts_torch, route_topk_softmax
from vlmx.ops import fused_moe as ops


@pytest.mark.skipif(INTERPRETER or not HAS_TRITON, reason="interpreter run, or no triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests run the kernels")
def test_interpreter_tests_in_a_subprocess():
    run_interpreter_tests(__file__)


def make_case(num_tokens, hidden, inter, num_experts, top_k, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(num_tokens * 31 + hidden)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, hidden, 2 * inter, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, inter, hidden, generator=g) / inter**0.5
    router = torch.randn(num_experts, hidden, generator=g)
    # uneven routing: the last experts are never picked, expert 0 often
    router[-2:] -= 100.0
    router[0] += 0.5
    to = dict(device=device, dtype=dtype)
    x, w13, w2, router = x.to(**to), w13.to(**to), w2.to(**to), router.to(**to)
    weights, ids = route_topk_softmax(x, router, top_k)
    return x, w13, w2, weights, ids


def test_moe_align_blocks_hold_one_expert_each():
    ids = torch.tensor([[0, 2], [2, 0], [2, 3], [0, 2], [2, 1]])
    sorted_ids, block_experts = ops.moe_align(ids, num_experts=5, block_m=4)
    flat = ids.flatten()
    num_pairs = flat.numel()
    assert sorted_ids.numel() == block_experts.numel() * 4
    seen = []
    for b, expert in enumerate(block_experts.tolist()):
        rows = sorted_ids[b * 4 : (b + 1) * 4].tolist()
        real = [r for r in rows if r < num_pairs]
        if expert < 0:
            assert not real
            continue
        assert real and all(flat[r] == expert for r in real)
        seen += real
    assert sorted(seen) == list(range(num_pairs))  # every pair once
    # expert 2 has 5 pairs -> 2 blocks; 0 -> 1; 1 -> 1; 3 -> 1; 4 -> none
    assert block_experts.tolist()[:5] == [0, 1, 2, 2, 3]
    assert set(block_experts.tolist()[5:]) <= {-1}


def test_moe_layer_matches_the_hf_moe_layer():
    """MoEMLP (torch path) == HF AriaTextMoELayer on the same weights."""
    from transformers import AriaTextConfig
    from transformers.models.aria.modeling_aria import AriaTextMoELayer

    cfg = AriaTextConfig(
        hidden_size=32, intermediate_size=16, moe_num_experts=5, moe_topk=2,
        moe_num_shared_experts=2, num_attention_heads=4,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = AriaTextMoELayer(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MoEMLP(MoEConfig.from_aria(cfg))
    with torch.no_grad():
        ours.router.weight.copy_(hf.router.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
        gate, up = hf.shared_experts.gate_proj.weight, hf.shared_experts.up_proj.weight
        ours.shared_experts.gate_up_proj.weight.copy_(torch.cat([gate, up]))
        ours.shared_experts.down_proj.weight.copy_(hf.shared_experts.down_proj.weight)
    x = torch.randn(7, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x[None])[0], atol=1e-5, rtol=1e-5)


CASES = [
    # tokens, hidden, intermediate, experts, top_k
    (1, 32, 32, 4, 2),  # one token (decode)
    (13, 48, 32, 6, 2),  # hidden no multiple of the block; two experts never picked
    (40, 32, 64, 4, 3),  # more rows per expert than a block
]


@in_interpreter
@pytest.mark.parametrize("case", CASES)
def test_fused_moe_matches_reference_in_interpreter(case):
    x, w13, w2, weights, ids = make_case(*case)
    assert ops.fused_moe_available(x, w13, w2)
    expected = moe_experts_torch(x, w13, w2, weights, ids)
    got = ops.fused_moe(x, w13, w2, weights, ids, block_m=16)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@in_interpreter
def test_fused_moe_with_no_tokens_in_interpreter():
    x, w13, w2, weights, ids = make_case(0, 32, 32, 4, 2)
    assert ops.fused_moe(x, w13, w2, weights, ids).shape == (0, 32)


@CUDA
@pytest.mark.parametrize("num_tokens", [1, 7, 100, 1000])
def test_fused_moe_matches_reference_on_cuda(num_tokens):
    x, w13, w2, weights, ids = make_case(num_tokens, 256, 128, 16, 4, "cuda", torch.bfloat16)
    expected = moe_experts_torch(x.float(), w13.float(), w2.float(), weights.float(), ids)
    got = ops.fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)
