"""The CUDA fast path of the attention layer: its step plan and dispatch (on any device, with
reference kernels standing in), and the real kernels against the torch backend (CUDA only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmx.layers import attention
from vlmx.layers.attention import (
    AttentionMetadata,
    build_fast_plan,
    paged_attention_fast,
    paged_attention_torch,
    varlen_attention,
)
from vlmx.ops import paged_attention as triton_ops
from vlmx.ops.varlen import flash_varlen_available, varlen_flash_attention
from vlmx.worker.cuda_graph import capture_sizes, round_up_to_size
from vlmx.worker.staging import StagingBuffer

CUDA = torch.cuda.is_available()
needs_flash = pytest.mark.skipif(
    not (CUDA and flash_varlen_available(torch.device("cuda"))),
    reason="needs a CUDA GPU with varlen FlashAttention",
)


def _reference_varlen(
    q, k, v, cu_q, cu_k, max_q, max_k, *, causal, scale=None, sliding_window=None
):
    """Per-sequence SDPA; causal is aligned bottom-right (query j sees keys 0 .. nk - nq + j),
    and a window W keeps keys > nk - nq + j - W."""
    out = torch.empty_like(q)
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i] : cu_q[i + 1]]
        ki, vi = k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        nq, nk = qi.shape[0], ki.shape[0]
        mask = None
        if causal:
            q_pos, k_pos = torch.arange(nk - nq, nk)[:, None], torch.arange(nk)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            mask = mask.to(q.device)
        o = F.scaled_dot_product_attention(
            qi.transpose(0, 1).float(),
            ki.transpose(0, 1).float(),
            vi.transpose(0, 1).float(),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[cu_q[i] : cu_q[i + 1]] = o.transpose(0, 1).to(q.dtype)
    return out


def _mixed_step(device, dtype, seq_lens, num_queries, heads=4, kv_heads=2, dim=64, block=4):
    """A step over a random paged cache: its keys/values already stored at their slots."""
    torch.manual_seed(0)
    num_blocks = sum(-(-n // block) for n in seq_lens) + 3
    kv_cache = torch.randn(2, num_blocks, block, kv_heads, dim, device=device, dtype=dtype)
    perm = torch.randperm(num_blocks).tolist()
    max_blocks = max(-(-n // block) for n in seq_lens)
    table = np.full((len(seq_lens), max_blocks), -1, dtype=np.int32)
    used = 0
    slots = []
    for i, (length, n) in enumerate(zip(seq_lens, num_queries)):
        ids = perm[used : used + -(-length // block)]
        used += len(ids)
        table[i, : len(ids)] = ids
        pos = np.arange(length - n, length)
        slots.append(table[i, pos // block].astype(np.int64) * block + pos % block)
    starts = np.concatenate(([0], np.cumsum(num_queries))).tolist()
    query = torch.randn(starts[-1], heads, dim, device=device, dtype=dtype)
    slot_mapping = torch.from_numpy(np.concatenate(slots)).to(device)
    flat_k = kv_cache[0].view(-1, kv_heads, dim)
    flat_v = kv_cache[1].view(-1, kv_heads, dim)
    key, value = flat_k[slot_mapping], flat_v[slot_mapping]  # the step's own keys
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.from_numpy(table).to(device),
        slot_mapping=slot_mapping,
        query_start_loc_cpu=starts,
        seq_lens_cpu=list(seq_lens),
        block_size=block,
    )

    def to_device(array, dtype_):
        return torch.as_tensor(np.asarray(array), dtype=dtype_).to(device)

    plan = build_fast_plan(
        starts, list(seq_lens), table, block, metadata.block_tables, metadata.seq_lens, to_device
    )
    return query, key, value, kv_cache, metadata, plan


@pytest.mark.parametrize(
    "seq_lens, num_queries, contiguous_rows",
    [
        ([9, 1, 17, 6, 12], [1, 1, 5, 1, 12], False),  # decodes among prefill chunks
        ([7, 11, 30], [1, 1, 1], True),  # decodes only
        ([5, 13, 8], [5, 13, 8], True),  # context-free prefills only: the step's own keys
        ([20, 9], [4, 9], True),  # a chunk after cached context: keys read back by slot
        ([3, 3, 40, 2], [1, 1, 6, 2], True),  # decodes first, then prefills
    ],
)
def test_fast_path_dispatch_matches_the_torch_backend(
    monkeypatch, seq_lens, num_queries, contiguous_rows
):
    """Plan + dispatch with reference kernels in place of FlashAttention and Triton."""
    monkeypatch.setattr(attention, "varlen_flash_attention", _reference_varlen)
    monkeypatch.setattr(
        triton_ops, "paged_decode_attention", triton_ops.paged_decode_attention_torch
    )
    query, key, value, kv_cache, metadata, plan = _mixed_step(
        "cpu", torch.float32, seq_lens, num_queries
    )
    if plan.prefill_rows is not None:
        assert isinstance(plan.prefill_rows, slice) == contiguous_rows
        cached = any(n < length for n, length in zip(num_queries, seq_lens) if n > 1)
        assert (plan.key_slots is not None) == cached
    out = paged_attention_fast(query, key, value, kv_cache, plan, scale=0.3)
    expected = paged_attention_torch(query, kv_cache, metadata, scale=0.3)
    torch.testing.assert_close(out, expected)
    # A sliding window shorter than most sequences, across their block boundaries (block 4).
    out = paged_attention_fast(query, key, value, kv_cache, plan, 0.3, sliding_window=6)
    windowed = paged_attention_torch(query, kv_cache, metadata, 0.3, sliding_window=6)
    torch.testing.assert_close(out, windowed)
    assert not torch.allclose(windowed, expected)


def test_capture_sizes_cover_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(256)[-1] == 256
    assert capture_sizes(100)[-1] == 112  # padded up to the next captured size
    sizes = capture_sizes(256)
    assert sizes == sorted(set(sizes))
    assert [round_up_to_size(sizes, n) for n in (1, 3, 17, 256, 300)] == [1, 4, 32, 256, 300]


@needs_flash
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_flash_attention_matches_reference(dtype):
    torch.manual_seed(0)
    q_lens, k_lens = [5, 1, 33, 64], [5, 9, 40, 64]
    cu_q = torch.tensor(np.concatenate(([0], np.cumsum(q_lens))), dtype=torch.int32).cuda()
    cu_k = torch.tensor(np.concatenate(([0], np.cumsum(k_lens))), dtype=torch.int32).cuda()
    q = torch.randn(sum(q_lens), 8, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(k_lens), 2, 128, device="cuda", dtype=dtype) for _ in range(2))
    for causal in (True, False):
        out = varlen_flash_attention(q, k, v, cu_q, cu_k, 33, 64, causal=causal, scale=0.1)
        ref = _reference_varlen(q, k, v, cu_q, cu_k, 33, 64, causal=causal, scale=0.1)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@needs_flash
@pytest.mark.parametrize(
    "seq_lens, num_queries",
    [
        ([9, 1, 170, 6, 120], [1, 1, 50, 1, 120]),
        ([700, 11, 3000], [1, 1, 1]),
        ([20, 300], [4, 300]),
    ],
)
def test_fast_path_kernels_match_the_torch_backend(seq_lens, num_queries):
    query, key, value, kv_cache, metadata, plan = _mixed_step(
        "cuda", torch.bfloat16, seq_lens, num_queries, heads=16, kv_heads=2, dim=128, block=16
    )
    out = paged_attention_fast(query, key, value, kv_cache, plan, scale=128**-0.5)
    expected = paged_attention_torch(query, kv_cache, metadata, scale=128**-0.5)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    for window in (16, 100):  # FlashAttention's window_size and the Triton decode window
        out = paged_attention_fast(query, key, value, kv_cache, plan, 128**-0.5, window)
        expected = paged_attention_torch(query, kv_cache, metadata, 128**-0.5, window)
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@needs_flash
def test_vision_varlen_attention_uses_flash_and_matches_sdpa():
    torch.manual_seed(0)
    cu = [0, 64, 128, 150, 1174]  # windows and a whole image, head_dim 80 as Qwen2.5-VL's tower
    q, k, v = (torch.randn(1174, 16, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = varlen_attention(q, k, v, cu, scale=80**-0.5)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    ref = _reference_varlen(q, k, v, cu_t, cu_t, 1024, 1024, causal=False, scale=80**-0.5)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (pinned memory)")
def test_staging_buffer_round_trips_and_reuses_its_memory():
    staging = StagingBuffer(torch.device("cuda"), num_bytes=1 << 12)
    for step in range(3):
        staging.begin()
        a = staging.to_device(np.arange(10) + step, torch.long)
        b = staging.to_device([[1, 2], [3, 4]], torch.int32)
        big = staging.to_device(np.arange(2000), torch.long)  # past the buffer: pinned alone
        staging.end()
        assert a.tolist() == list(range(step, step + 10))
        assert b.tolist() == [[1, 2], [3, 4]]
        assert big.sum().item() == sum(range(2000))


def _counting(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


@needs_flash
def test_decode_graphs_match_eager_steps(qwen2_5_vl_ckpt, test_images):
    """CUDA graphs replay decode steps with the same results as eager steps (bf16, 3 prompts
    of 1-3 images, 8 greedy tokens each), and really are replayed."""
    from vlmx import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)
    prompts = [
        {
            "prompt": "<|vision_start|><|image_pad|><|vision_end|>" * len(images) + "Describe.",
            "multi_modal_data": {"image": images},
        }
        for images in (test_images[:1], test_images[1:3], test_images[2:5])
    ]
    outputs = {}
    for eager in (True, False):
        llm = LLM(
            model=qwen2_5_vl_ckpt,
            dtype="bfloat16",
            device="cuda",
            max_model_len=2048,
            enforce_eager=eager,
        )
        runner = llm.llm_engine.executor.runner
        assert (runner.graphs is None) == eager
        replays, decode_steps = [], []
        if not eager:
            runner.graphs.run = _counting(runner.graphs.run, replays)
        launch = runner.launch

        def counting_launch(out, *args, launch=launch, decode_steps=decode_steps):
            if all(n == 1 for n in out.num_scheduled_tokens):
                decode_steps.append(1)
            return launch(out, *args)

        runner.launch = counting_launch
        outputs[eager] = llm.generate(prompts, params, use_tqdm=False)
        # NOTE: how many steps decode only depends on when each prompt reaches the engine
        assert len(decode_steps) >= 7
        assert len(replays) == (0 if eager else len(decode_steps))  # every decode-only step
    for eager_out, graph_out in zip(outputs[True], outputs[False]):
        assert eager_out.outputs[0].token_ids == graph_out.outputs[0].token_ids
        tokens = eager_out.outputs[0].token_ids
        for token_id, a, b in zip(
            tokens, eager_out.outputs[0].logprobs, graph_out.outputs[0].logprobs
        ):
            assert abs(a[token_id].logprob - b[token_id].logprob) < 1e-2


def test_padded_logits_rows_sample_each_request_from_its_own_row(qwen2_5_vl_ckpt, test_images):
    """On CUDA the LM head reads rows padded to a captured size (a few GEMM shapes, warmed up
    at start). Each request must still sample from its own last token: three prompts run
    together with padded rows (forced here on the CPU, float32) give the tokens and logprobs
    each gives alone, both in the step that gathers the prompts' last tokens (3 -> 4 rows) and
    in the steps where every row decodes."""
    from vlmx import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True)
    prompts = [
        {
            "prompt": "<|vision_start|><|image_pad|><|vision_end|>" * len(images) + text,
            "multi_modal_data": {"image": images},
        }
        for images, text in (
            (test_images[:1], "Describe."),
            (test_images[1:3], "Compare these two pictures, please."),
            (test_images[2:4], "Count the shapes"),
        )
    ]
    llm = LLM(model=qwen2_5_vl_ckpt, device="cpu", max_model_len=2048, enable_prefix_caching=False)
    runner = llm.llm_engine.executor.runner
    assert runner.logits_sizes is None  # the CPU: unpadded
    alone = [llm.generate([prompt], params, use_tqdm=False)[0] for prompt in prompts]
    runner.logits_sizes = [4, 8]
    heads = []
    head = runner.model.compute_logits
    runner.model.compute_logits = lambda hidden: heads.append(hidden.shape[0]) or head(hidden)
    together = llm.generate(prompts, params, use_tqdm=False)
    assert heads == [4] * params.max_tokens  # each step samples all three
    for a, b in zip(alone, together):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert step_a.keys() == step_b.keys()
            for token_id in step_a:
                assert abs(step_a[token_id].logprob - step_b[token_id].logprob) < 1e-4


@needs_flash
def test_lm_head_meets_only_warmed_up_sizes(qwen2_5_vl_ckpt, test_images):
    """CUDA: `warm_up` runs the LM head at every padded size, and a run (prompts finishing at
    different steps, so the number of sampled rows changes) uses no other size."""
    from vlmx import LLM, SamplingParams

    llm = LLM(model=qwen2_5_vl_ckpt, dtype="bfloat16", device="cuda", max_model_len=2048)
    runner = llm.llm_engine.executor.runner
    sizes = runner.logits_sizes
    assert sizes == capture_sizes(llm.llm_engine.config.scheduler_config.max_num_seqs)
    head = runner.model.compute_logits
    seen = []
    runner.model.compute_logits = lambda hidden: seen.append(hidden.shape[0]) or head(hidden)
    runner.warm_up()
    assert seen == sizes
    seen.clear()
    prompts = [
        {
            "prompt": "<|vision_start|><|image_pad|><|vision_end|>" + f"Describe {i}.",
            "multi_modal_data": {"image": [test_images[i % len(test_images)]]},
        }
        for i in range(5)
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=2 + 3 * i, ignore_eos=True) for i in range(5)
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [2 + 3 * i for i in range(5)]
    assert seen and set(seen) <= set(sizes)
