"""Mllama's batched cross-attention and vision tower (`vlmx.worker.cross_attention`), on the
tiny random checkpoint of `tests/test_mllama.py`:

- one step of requests with different numbers of images and tiles, text-only requests and
  text between images, equal to the requests run one by one (and to HF); their images in one
  tower call; every decode step one varlen batch (no masked sequence), with the pool's unread
  keys between its sequences;
- the batch's segments (runs of unread keys as segments of no query) and the pool's first-fit
  allocation and compaction (the keys move with their entry).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MllamaForConditionalGeneration as HFMllama

from tests.families.mllama_checkpoint import build_mllama_checkpoint
from tests.hf_reference import (
    TEST_ATOL,
    TEST_DEVICE,
    TEST_DTYPE,
    HFReference,
    compare_with_reference,
)
from vlmx import LLM, SamplingParams
from vlmx.demo.images import structured_image
from vlmx.worker.cross_attention import CrossEntry

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return build_mllama_checkpoint(tmp_path_factory.mktemp("mllama_batching"))


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(
        model=ckpt,
        max_model_len=1024,
        limit_mm_per_prompt={"image": 3},
        dtype=TEST_DTYPE,
        device=TEST_DEVICE,
    )


def _generate(llm: LLM, batch):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in batch]
    return llm.generate(prompts, GREEDY, use_tqdm=False)


def _mixed_batch():
    """1, 3, 0, 2 and 2 images of 1 to 4 tiles; text before, between and after them."""
    im = [structured_image(w, h, v) for w, h, v in ((28, 28, 0), (300, 400, 1), (30, 900, 2),
          (56, 56, 3), (1024, 768, 4), (112, 28, 5), (20, 30, 6), (700, 25, 7))]  # fmt: skip
    return [
        (f"<|image|><|begin_of_text|>{QUESTION}", im[:1]),
        (f"<|begin_of_text|>Look: <|image|><|image|> and <|image|>{QUESTION}", im[1:4]),
        (f"<|begin_of_text|>{QUESTION} No image here.", []),
        (f"<|image|><|image|><|begin_of_text|>{QUESTION}", im[4:6]),
        (f"<|begin_of_text|>First <|image|> then <|image|>{QUESTION}", im[6:8]),
    ]


def test_mixed_step_equals_one_by_one(ckpt, llm) -> None:
    store = llm.llm_engine.executor.runner.cross
    batch = _mixed_batch()
    alone = [_generate(llm, [request])[0] for request in batch]
    steps = []
    metadata = store.metadata

    def recorded(states, num_scheduled):
        out = metadata(states, num_scheduled)
        steps.append((list(num_scheduled), out))
        return out

    calls, computed = store.num_tower_calls, store.num_computed
    store.metadata = recorded
    try:
        together = _generate(llm, batch)
    finally:
        del store.metadata
    assert store.num_computed == computed + 4
    assert store.num_tower_calls == calls + 1  # 8 images: one tower call in the first step
    first_scheduled, _ = steps[0]
    assert len(first_scheduled) == len(batch)  # every request in the first step
    prefill = steps[0][1]  # runs before and between images attend beside the batch
    assert prefill.batch is not None and prefill.batch.num_rows > 0
    assert any(seq.mask is not None for seq in prefill.masked)  # image 0 only: masked
    assert any(seq.mask is None for seq in prefill.masked)  # no image yet: every key

    decodes = [m for n, m in steps if len(n) == len(batch) and all(k == 1 for k in n)]
    assert decodes
    for cross in decodes:
        assert not cross.masked and cross.batch is not None
        assert cross.batch.num_rows == 4  # the text-only request skips the layer
        segments = np.diff(cross.batch.cu_q)
        assert (segments == 0).any()  # the unread keys (padding tiles, image 0) between them

    ref = HFReference(ckpt, model_cls=HFMllama)
    for (prompt, images), a, b in zip(batch, together, alone, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for token_id in y:
                assert abs(x[token_id].logprob - y[token_id].logprob) < max(2e-3, TEST_ATOL)
        compare_with_reference(ref, prompt, images, a)


def _entry(slot: int, num_images: int) -> CrossEntry:
    empty = np.zeros(num_images, dtype=np.int64)
    none = torch.zeros(0)
    return CrossEntry(slot, num_images, empty, empty, none, none, 0, 0, 0)


def test_segments_allocation_and_compaction(llm) -> None:
    store = llm.llm_engine.executor.runner.cross
    _generate(llm, [(QUESTION, [])])  # the store hears of the last requests' end
    assert not store.entries
    n = store.keys_per_image
    batch = store._batch([(0, 5, 0, 2), (3 * n, 7, 2, 1), (3 * n + 7, 4, 3, 3)])
    assert batch.cu_q == [0, 2, 2, 3, 6]
    assert batch.cu_k == [0, 5, 3 * n, 3 * n + 7, 3 * n + 11]
    assert batch.num_rows == 6

    with torch.inference_mode():  # the runner's mode: the pool is an inference tensor
        capacity = store.capacity
        assert capacity >= 5
        pool = store._pool()
        try:
            store.entries = {"a": _entry(0, 1), "b": _entry(2, 2), "c": _entry(4, capacity - 4)}
            assert store._first_fit(1) == 1 and store._first_fit(2) is None
            pool[:, :, 2 * n : 4 * n] = 7.0  # b's keys
            store.entries = {"a": _entry(0, 1), "b": _entry(2, 2), "c": _entry(5, capacity - 5)}
            assert store._first_fit(2) is None
            slot = store._allocate(2)  # a at 0, b moved to 1..2, c to 3..: 2 free at the end
            assert (store.entries["b"].slot, store.entries["c"].slot, slot) == (1, 3, capacity - 2)
            assert (pool[:, :, n : 3 * n] == 7.0).all()
        finally:
            store.entries = {}
