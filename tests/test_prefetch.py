"""`LLM.generate` / `chat` process prompts on worker threads, ahead of the engine.

```
worker threads:  process_prompt(0) process_prompt(1) ...      a bounded number ahead
main thread:     add_processed_request(0), step(), add_processed_request(1), step(), ...
```

Outputs must equal feeding the engine one prompt at a time, bad prompts must still be reported
by index, and what the workers share (processor cache, image pool, PIL images) must be safe to
use from several threads at once.
"""

from __future__ import annotations

import base64
import io
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from tests.engine_helpers import check_idle
from vlmx import LLM, InvalidPromptsError, RequestOutput, SamplingParams
from vlmx import llm as llm_module
from vlmx.demo.images import structured_image
from vlmx.llm import _ProcessAhead
from vlmx.multimodal.cache import TensorCache
from vlmx.multimodal.loader import MediaLoader

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
MAX_NUM_SEQS = 2  # the engine takes 2 * 2 requests; 2 prompts are processed ahead of it
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, logprobs=2)


def chat_prompt(num_images: int, question: str = "What is in each image?") -> str:
    return (
        f"<|im_start|>user\n{PLACEHOLDER * num_images}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def _with_images(images: list[Image.Image], question: str = "What is in each image?") -> dict:
    return {"prompt": chat_prompt(len(images), question), "multi_modal_data": {"image": images}}


def _tokens(output: RequestOutput) -> list[list[int]]:
    return [list(c.token_ids) for c in output.outputs]


def _assert_same(outputs: list[RequestOutput], expected: list[RequestOutput]) -> None:
    """Same tokens and top logprob tokens; logprobs equal to float32 rounding, as the batches
    that a step runs (which float32 sums depend on) differ with timing."""
    assert [_tokens(o) for o in outputs] == [_tokens(o) for o in expected]
    for output, other in zip(outputs, expected, strict=True):
        for completion, other_completion in zip(output.outputs, other.outputs, strict=True):
            for entry, other_entry in zip(
                completion.logprobs, other_completion.logprobs, strict=True
            ):
                assert entry.keys() == other_entry.keys()
                for token_id, logprob in entry.items():
                    assert logprob.logprob == pytest.approx(other_entry[token_id].logprob, abs=1e-4)


@pytest.fixture(scope="module")
def llm(qwen2_vl_ckpt) -> LLM:
    return LLM(
        model=qwen2_vl_ckpt,
        dtype="float32",
        device="cpu",
        max_model_len=2048,
        max_num_seqs=MAX_NUM_SEQS,
        limit_mm_per_prompt={"image": 2},
        seed=0,
    )


@pytest.fixture(scope="module")
def prompts(test_images) -> list:
    """Text and image prompts; the same image object comes back in several of them."""
    a, b, c, d, e = test_images
    return [
        _with_images([a]),
        "The capital of France is",
        _with_images([b, c]),
        _with_images([a], "Describe it."),
        _with_images([d, e]),
        "1, 2, 3,",
        _with_images([e, a]),
        _with_images([c]),
    ]


@contextmanager
def _wrapped(obj: object, name: str, wrapper: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace the bound method `obj.name` by `wrapper(method)` for the block."""
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        delattr(obj, name)


# ---------------------------------------------------------------------------------------------
# Outputs and threads


def test_outputs_equal_one_request_at_a_time(llm, prompts):
    """Greedy and seeded outputs are those of feeding the engine one prompt at a time with
    `add_request` and stepping it until that prompt is done (see `_assert_same`)."""
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=4, logprobs=2)
    params = [seeded if i % 3 == 2 else GREEDY for i in range(len(prompts))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    check_idle(llm)

    engine = llm.llm_engine
    expected = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"one-at-a-time-{i}", prompt, p)
        expected += engine.run_until_done()
    _assert_same(outputs, expected)
    assert [o.prompt_token_ids for o in outputs] == [o.prompt_token_ids for o in expected]
    request_ids = [int(o.request_id) for o in outputs]  # given in prompt order
    assert request_ids == list(range(request_ids[0], request_ids[0] + len(prompts)))
    check_idle(llm)
    cache = engine.processor.cache  # filled by several threads, some with the same images
    held = sum(
        sum(t.numel() * t.element_size() for t in entry) for entry in cache._entries.values()
    )
    assert cache.num_bytes == held <= cache.capacity_bytes


def test_processing_runs_on_worker_threads(llm, prompts, monkeypatch):
    """The processor (and image loading, for chat's JPEG data URLs) never runs on the main
    thread."""
    threads: list[threading.Thread] = []

    def record(process: Callable) -> Callable:
        def process_and_record(*args, **kwargs):
            threads.append(threading.current_thread())
            return process(*args, **kwargs)

        return process_and_record

    media = llm.llm_engine.media
    monkeypatch.setattr(media, "load", record(media.load))
    with _wrapped(llm.llm_engine.processor, "process", record):
        llm.generate(prompts, GREEDY, use_tqdm=False)
        assert len(threads) == len(prompts) + 9  # one process per prompt, 9 images
        threads.clear()
        buffer = io.BytesIO()
        structured_image(96, 64, 2).save(buffer, format="JPEG")
        url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        conversation = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ]
        llm.chat([conversation] * 3, GREEDY, use_tqdm=False)
        assert len(threads) == 3 + 3  # per conversation: one process, one image decoded
    assert threading.main_thread() not in threads
    assert all(t.name.startswith(("vlmx-prompt", "vlmx-image")) for t in threads)


# ---------------------------------------------------------------------------------------------
# Bad prompts


def test_bad_prompts_are_reported_by_index(llm, prompts, test_images):
    """Bad prompts among good ones, failing on a worker (ValueError, another exception) or on
    the main thread (sampling params), are reported by index; the good ones run as alone."""
    good = [prompts[0], prompts[1], prompts[2]]
    baseline = llm.generate(good, GREEDY, use_tqdm=False)
    too_many_logprobs = SamplingParams(temperature=0.0, max_tokens=4, logprobs=1000)
    batch = [
        good[0],
        {"prompt": chat_prompt(2), "multi_modal_data": {"image": [test_images[0]]}},
        good[1],
        {"prompt": "hi", "bogus": 1},
        "boom",  # the engine's process_prompt raises RuntimeError for it (below)
        "Hello there",  # bad params and a fine prompt
        {"prompt": "hi", "bogus": 2},  # bad params and a bad prompt: the params' error wins
        good[2],
    ]
    params = [GREEDY] * len(batch)
    params[5] = params[6] = too_many_logprobs

    def boom_on_boom(process_prompt: Callable) -> Callable:
        def process(prompt):
            if prompt == "boom":
                raise RuntimeError("boom")
            return process_prompt(prompt)

        return process

    with (
        _wrapped(llm.llm_engine, "process_prompt", boom_on_boom),
        pytest.raises(InvalidPromptsError) as info,
    ):
        llm.generate(batch, params, use_tqdm=False)
    errors = info.value.errors
    assert sorted(errors) == [1, 3, 4, 5, 6]
    assert "2 image placeholders" in errors[1] and "1 images were given" in errors[1]
    assert "unknown keys ['bogus']" in errors[3]
    assert errors[4] == "RuntimeError: boom"
    assert "over max_logprobs" in errors[5] and "over max_logprobs" in errors[6]
    outputs = info.value.outputs
    assert [output is None for output in outputs] == [i in errors for i in range(len(batch))]
    _assert_same([outputs[i] for i in (0, 2, 7)], baseline)
    check_idle(llm)
    # The LLM works as before afterwards.
    _assert_same(llm.generate(good, GREEDY, use_tqdm=False), baseline)


def test_bad_chat_conversation_is_reported_by_index(llm):
    """A conversation that fails to render is reported by its index, and its own error wins
    over its sampling params' error."""
    good = [{"role": "user", "content": "Hello"}]
    too_many_logprobs = SamplingParams(temperature=0.0, max_tokens=4, logprobs=1000)
    with pytest.raises(InvalidPromptsError) as info:
        llm.chat(
            [good, [{"content": "no role"}], good],
            [GREEDY, too_many_logprobs, GREEDY],
            use_tqdm=False,
        )
    assert list(info.value.errors) == [1] and "has no 'role'" in info.value.errors[1]
    first, missing, last = info.value.outputs
    assert missing is None
    _assert_same([first], [last])
    check_idle(llm)


def test_interrupt_aborts_requests(llm, prompts):
    """A KeyboardInterrupt while the engine steps leaves no request behind, no prompt is
    processed past the lookahead, and the LLM works afterwards."""
    engine = llm.llm_engine
    started = []

    def slow(process_prompt: Callable) -> Callable:
        def process(prompt):
            started.append(prompt)
            time.sleep(0.02)
            return process_prompt(prompt)

        return process

    def interrupt_second(step: Callable) -> Callable:
        calls = []

        def interrupting_step():
            calls.append(None)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return step()

        return interrupting_step

    many = ["Count: 1, 2, 3,"] * 40
    with _wrapped(engine, "process_prompt", slow), _wrapped(engine, "step", interrupt_second):
        with pytest.raises(KeyboardInterrupt):
            llm.generate(many, GREEDY, use_tqdm=False)
        time.sleep(0.2)  # time for any stray worker to pick up more prompts
    assert len(started) <= 2 * MAX_NUM_SEQS + MAX_NUM_SEQS  # the engine's, and those ahead
    check_idle(llm)
    assert len(llm.generate(prompts[:2], GREEDY, use_tqdm=False)) == 2


# ---------------------------------------------------------------------------------------------
# Lookahead


@pytest.mark.parametrize("process_ahead", [None, 1])
def test_lookahead_is_bounded(llm, monkeypatch, process_ahead):
    """With a slow engine and fast processing, the workers run ahead of the engine by exactly
    min(max_num_seqs, PROCESS_AHEAD) prompts, never more."""
    if process_ahead is not None:
        monkeypatch.setattr(llm_module, "PROCESS_AHEAD", process_ahead)
    expected = min(MAX_NUM_SEQS, llm_module.PROCESS_AHEAD)
    engine = llm.llm_engine
    lock = threading.Lock()
    num_started = 0
    num_added = 0
    num_ahead: list[int] = []  # prompts started but not queued, seen from the main thread

    def count_started(process_prompt: Callable) -> Callable:
        def process(prompt):
            nonlocal num_started
            with lock:
                num_started += 1
            return process_prompt(prompt)

        return process

    def count_added(add: Callable) -> Callable:
        def add_and_count(*args, **kwargs):
            nonlocal num_added
            num_added += 1
            with lock:
                # NOTE: this prompt is taken already; the ones after it may be processing.
                num_ahead.append(num_started - num_added)
            return add(*args, **kwargs)

        return add_and_count

    def slow(step: Callable) -> Callable:
        def slow_step():
            time.sleep(0.005)
            with lock:
                num_ahead.append(num_started - num_added)
            return step()

        return slow_step

    with (
        _wrapped(engine, "process_prompt", count_started),
        _wrapped(engine, "add_processed_request", count_added),
        _wrapped(engine, "step", slow),
    ):
        outputs = llm.generate([f"{i} + {i} =" for i in range(30)], GREEDY, use_tqdm=False)
    assert len(outputs) == 30 and num_started == num_added == 30
    assert max(num_ahead) == expected
    check_idle(llm)


def test_first_step_waits_for_a_full_step(llm):
    """With nothing running, the engine does not step on the first processed prompt while more
    are coming: it waits until the queued prompts fill a step (here: until the queue is full,
    2 * max_num_seqs requests, as the prompts are short)."""
    engine = llm.llm_engine
    queued_at_step: list[int] = []

    def slow(process_prompt: Callable) -> Callable:
        def process(prompt):
            time.sleep(0.01)
            return process_prompt(prompt)

        return process

    def record(step: Callable) -> Callable:
        def record_step():
            queued_at_step.append(engine.scheduler.num_unfinished)
            return step()

        return record_step

    with _wrapped(engine, "process_prompt", slow), _wrapped(engine, "step", record):
        outputs = llm.generate([f"{i} + {i} =" for i in range(8)], GREEDY, use_tqdm=False)
    assert len(outputs) == 8
    assert queued_at_step[0] == 2 * MAX_NUM_SEQS
    check_idle(llm)


def test_cancel_drops_prompts_not_started():
    """After `cancel`, prompts still queued on the pool are never processed."""
    first_started, release = threading.Event(), threading.Event()
    started = []

    def process(prompt: int) -> int:
        started.append(prompt)
        first_started.set()
        release.wait()
        return prompt

    with ThreadPoolExecutor(1) as pool:
        ahead = _ProcessAhead(pool, process, list(range(10)), max_ahead=4)
        first_started.wait()
        ahead.cancel()
        release.set()
    assert started == [0]


# ---------------------------------------------------------------------------------------------
# What the workers share


def test_processor_cache_is_thread_safe():
    """Threads that get and put in a small cache at once (switching as often as Python allows)
    keep it consistent. Without its lock, evictions race: KeyError on an empty dict."""
    entries = {f"k{i}": torch.zeros(16) for i in range(12)}  # 64 bytes each
    cache: TensorCache[torch.Tensor] = TensorCache(capacity_bytes=4 * 64)
    errors: list[Exception] = []
    barrier = threading.Barrier(8)

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        try:
            for _ in range(2000):
                key = f"k{rng.randrange(len(entries))}"
                if rng.random() < 0.5:
                    cache.put(key, entries[key])
                else:
                    cache.get(key)
        except Exception as e:
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    held = sum(entry.numel() * entry.element_size() for entry in cache._entries.values())
    assert cache.num_bytes == held <= cache.capacity_bytes


def test_one_lazily_opened_image_loads_in_several_threads_at_once():
    """A PIL image opened from bytes decodes on first use; several prompts (here: one prompt
    with the image 8 times) may load it at once, which PIL alone gets wrong."""
    buffer = io.BytesIO()
    structured_image(640, 480, 1).save(buffer, format="PNG")
    loader = MediaLoader()
    expected = loader.load_all([Image.open(io.BytesIO(buffer.getvalue()))])[0]
    for _ in range(5):
        image = Image.open(io.BytesIO(buffer.getvalue()))
        for loaded in loader.load_all([image] * 8):
            assert torch.equal(loaded, expected)


def test_image_loads_share_one_pool(monkeypatch):
    """A loader's calls reuse its few threads, and one call runs at most max_workers loads at
    once; another loader (another engine) has threads of its own."""
    threads: set[threading.Thread] = set()
    lock = threading.Lock()
    running = 0
    most_running = 0
    loader = MediaLoader(max_workers=4)
    load = loader.load

    def tracked(source):
        nonlocal running, most_running
        with lock:
            threads.add(threading.current_thread())
            running += 1
            most_running = max(most_running, running)
        time.sleep(0.002)
        with lock:
            running -= 1
        return load(source)

    monkeypatch.setattr(loader, "load", tracked)
    sources = [torch.full((3, 2, 2), i, dtype=torch.uint8) for i in range(6)]
    for _ in range(20):
        images = loader.load_all(sources)
        assert [int(image[0, 0, 0]) for image in images] == list(range(6))
    assert 1 < len(threads) <= 4
    assert all(t.name.startswith("vlmx-image") for t in threads)
    most_running = 0
    images = loader.load_all(sources, max_workers=2)
    assert [int(image[0, 0, 0]) for image in images] == list(range(6))
    assert most_running <= 2
    other = MediaLoader(max_workers=4)
    first_threads = set(threads)
    threads.clear()
    monkeypatch.setattr(other, "load", tracked)
    other.load_all(sources)
    assert threads and not threads & first_threads


def test_a_loader_works_in_a_forked_child(monkeypatch):
    """A loader whose pool ran in the parent starts a fresh pool (and cache) in a forked child,
    where the parent's threads are gone (the parent's idle ones would take the child's loads)."""
    loader = MediaLoader()
    load = loader.load
    monkeypatch.setattr(loader, "load", lambda source: time.sleep(0.05) or load(source))
    sources = [torch.full((3, 2, 2), i, dtype=torch.uint8) for i in range(6)]
    assert len(loader.load_all(sources)) == 6  # the parent's pool has 6 threads, idle now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the loads came back in order
        status = 1
        try:
            signal.alarm(10)  # a deadlock ends the child rather than hang the test
            images = loader.load_all(sources[:2])
            status = 0 if [int(image[0, 0, 0]) for image in images] == [0, 1] else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(loader.load_all(sources)) == 6  # the parent's loader is unaffected
