"""Async scheduling: each step is scheduled and launched before the previous step's samples are
read; outputs must equal those of the synchronous engine (CPU, float32)."""

from __future__ import annotations

import pytest

from vlmx import LLM, SamplingParams


def _llm(path: str, async_scheduling: bool, **kwargs) -> LLM:
    return LLM(
        model=path,
        max_model_len=2048,
        async_scheduling=async_scheduling,
        seed=0,
        **kwargs,
    )


def _prompts(images: list) -> list[dict]:
    groups = [images[:1], images[1:3], images[2:5], images[3:4]]
    return [
        {
            "prompt": "<|im_start|>user\\n"
            + "<|vision_start|><|image_pad|><|vision_end|>" * len(g)
            + f"Describe image group {i}.<|im_end|>\\n<|im_start|>assistant\\n",
            "multi_modal_data": {"image": g},
        }
        for i, g in enumerate(groups)
    ]


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def sync_and_async(qwen2_5_vl_ckpt):
    return _llm(qwen2_5_vl_ckpt, False), _llm(qwen2_5_vl_ckpt, True)


def test_async_scheduling_is_on_by_default_only_on_cuda(qwen2_5_vl_ckpt):
    llm = LLM(model=qwen2_5_vl_ckpt, max_model_len=2048, device="cpu")
    assert not llm.llm_engine.config.async_scheduling


def test_outputs_equal_the_synchronous_engine(sync_and_async, test_images):
    sync_llm, async_llm = sync_and_async
    prompts = _prompts(test_images)
    # different lengths: requests finish at different steps while the next step is in flight
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2)
        for n in (1, 5, 9, 3)
    ]
    calls = []
    engine = async_llm.llm_engine
    original = engine.scheduler.advance
    engine.scheduler.advance = lambda out: calls.append(1) or original(out)
    expected = sync_llm.generate(prompts, params, use_tqdm=False)
    got = async_llm.generate(prompts, params, use_tqdm=False)
    engine.scheduler.advance = original
    assert calls, "the async engine never scheduled ahead"
    assert _tokens(got) == _tokens(expected)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    for a, b in zip(got, expected):
        for entry_a, entry_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert entry_a.keys() == entry_b.keys()
            for token_id in entry_a:
                assert abs(entry_a[token_id].logprob - entry_b[token_id].logprob) < 1e-4
    assert not engine.has_unfinished_requests()
    engine.scheduler.check_integrity()


def test_a_stop_token_ends_a_request_while_its_next_step_runs(sync_and_async, test_images):
    """A request that samples a stop token had its next step launched already: that step's
    sample is dropped and the output ends exactly where the synchronous engine's does."""
    sync_llm, async_llm = sync_and_async
    prompts = _prompts(test_images)
    free = sync_llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    stops = [toks[3] for toks in _tokens(free)]  # each prompt's 4th greedy token
    params = [
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=[t])
        for t in stops
    ]
    expected = sync_llm.generate(prompts, params, use_tqdm=False)
    got = async_llm.generate(prompts, params, use_tqdm=False)
    assert _tokens(got) == _tokens(expected)
    assert [o.outputs[0].finish_reason for o in got] == [
        o.outputs[0].finish_reason for o in expected
    ]
    assert all(len(t) <= 4 for t in _tokens(got))
    async_llm.llm_engine.scheduler.check_integrity()


def test_penalties_and_stop_strings_fall_back_to_synchronous_steps(sync_and_async, test_images):
    sync_llm, async_llm = sync_and_async
    prompts = _prompts(test_images)[:2]
    params = SamplingParams(temperature=0.0, max_tokens=6, repetition_penalty=1.3, stop=["zz"])
    engine = async_llm.llm_engine
    calls = []
    original = engine.scheduler.advance
    engine.scheduler.advance = lambda out: calls.append(1) or original(out)
    got = async_llm.generate(prompts, params, use_tqdm=False)
    engine.scheduler.advance = original
    assert not calls
    assert _tokens(got) == _tokens(sync_llm.generate(prompts, params, use_tqdm=False))


def test_same_outputs_under_preemption(qwen2_5_vl_ckpt, test_images):
    """A KV cache too small for all requests: preemption happens while steps are in flight."""
    prompts = _prompts(test_images)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    longest = max(
        len(o.prompt_token_ids)
        for o in _llm(qwen2_5_vl_ckpt, False).generate(
            prompts, SamplingParams(max_tokens=1), use_tqdm=False
        )
    )
    results = {}
    for flag in (False, True):
        llm = _llm(
            qwen2_5_vl_ckpt,
            flag,
            num_gpu_blocks_override=-(-(longest + 12) // 16) + 2,
            max_num_batched_tokens=32,
            max_num_seqs=4,
            enable_prefix_caching=False,
        )
        results[flag] = _tokens(llm.generate(prompts, params, use_tqdm=False))
        if flag:
            assert llm.llm_engine.scheduler.num_preemptions > 0
            llm.llm_engine.scheduler.check_integrity()
    assert results[True] == results[False]
