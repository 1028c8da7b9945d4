"""Device memory: the KV cache is sized around the largest step and the images held between
steps, and the engine's requests never hold more encoder inputs than that reservation.

```
| weights | largest step (encoder at its budget, decoder) | images (mm_input_gb) | KV ... |
```
"""

from __future__ import annotations

import weakref

import pytest

from tests.test_prefetch import GREEDY, _assert_same, _with_images
from vlmx import LLM
from vlmx.engine.engine import input_bytes
from vlmx.worker.worker import kv_blocks_for_budget

GIB = 2**30


def _engine_kwargs(model: str, max_num_seqs: int) -> dict:
    """A tiny CPU engine for two images per prompt."""
    return dict(
        model=model,
        dtype="float32",
        device="cpu",
        max_model_len=2048,
        max_num_seqs=max_num_seqs,
        limit_mm_per_prompt={"image": 2},
    )


def test_kv_blocks_leave_the_peak_and_the_reserved_images_out():
    # 100 GiB at 0.9: 90 GiB, less a 20 GiB peak and 5 GiB for images, in 1 GiB blocks.
    assert kv_blocks_for_budget(100 * GIB, 0.9, 20 * GIB, 5 * GIB, GIB) == 65
    assert kv_blocks_for_budget(100 * GIB, 0.9, 20 * GIB, 0, GIB) == 70
    assert kv_blocks_for_budget(100 * GIB, 0.5, 40 * GIB, 20 * GIB, GIB) == 0  # never negative


def test_mm_input_gb_is_checked():
    with pytest.raises(ValueError, match="mm_input_gb must be >= 0"):
        LLM(model="demo", device="cpu", mm_input_gb=-1)


@pytest.mark.parametrize("budget_prompts", [1, 2])
def test_requests_hold_no_more_encoder_inputs_than_the_budget(
    qwen2_vl_ckpt, test_images, budget_prompts
):
    """With room for the inputs of about `budget_prompts` prompts, `LLM` adds a prompt only while
    the queued ones hold less than the budget (or none is queued), and the outputs are those of
    an unbounded run."""
    prompts = [_with_images([test_images[i % 5], test_images[(i + 2) % 5]]) for i in range(6)]
    kwargs = _engine_kwargs(qwen2_vl_ckpt, max_num_seqs=4)
    expected = LLM(**kwargs).generate(prompts, GREEDY, use_tqdm=False)

    probe = LLM(**kwargs)
    per_prompt = max(
        input_bytes(probe.llm_engine.process_prompt(p)[1]) for p in prompts
    )  # all six are about the same size
    assert per_prompt > 0
    budget_gb = budget_prompts * per_prompt / GIB
    llm = LLM(**kwargs, mm_input_gb=budget_gb)
    engine = llm.llm_engine
    assert engine.executor.mm_input_bytes == int(budget_gb * GIB)
    before = []  # (requests in the engine, their input bytes) before each prompt is added
    add = engine.add_processed_request

    def counting_add(*args, **kw):
        before.append((len(engine.requests), engine.num_input_bytes))
        add(*args, **kw)

    engine.add_processed_request = counting_add
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _assert_same(outputs, expected)
    budget = engine.executor.mm_input_bytes
    assert all(n == 0 or num_bytes < budget for n, num_bytes in before), before
    assert engine.num_input_bytes == 0 and not engine.input_bytes
    most = max(n for n, _ in before) + 1
    unbounded = LLM(**kwargs)
    seen = []
    add2 = unbounded.llm_engine.add_processed_request
    unbounded.llm_engine.add_processed_request = lambda *a, **k: (
        add2(*a, **k),
        seen.append(len(unbounded.llm_engine.requests)),
    )
    unbounded.generate(prompts, GREEDY, use_tqdm=False)
    assert max(seen) > most  # without the budget, more are taken in at once


def test_an_llm_is_freed_once_dropped(qwen2_vl_ckpt, test_images):
    """No reference cycle keeps an engine (its model, caches and images) alive once the caller
    drops its `LLM`: the engine freezes the collector's generations, so a cycle would never be
    collected."""
    llm = LLM(**_engine_kwargs(qwen2_vl_ckpt, max_num_seqs=2))
    llm.generate(_with_images(test_images[:2]), GREEDY, use_tqdm=False)
    llm.chat(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], GREEDY, use_tqdm=False
    )
    engine = weakref.ref(llm.llm_engine)
    model = weakref.ref(llm.llm_engine.executor.worker.model)
    del llm
    assert engine() is None and model() is None
