"""Scheduler over a real KVCacheManager and EncoderCacheManager, driven by a fake model.

`FakeEngine.step()` checks, every step: the budgets, that every image a step touches has its
encoder output and none is encoded twice, that every sequence attends to KV computed from its own
prefix, and the caches' own integrity (see tests/engine_helpers.py).
"""

from __future__ import annotations

import random

import pytest

from tests.engine_helpers import (
    EOS_ID,
    FIRST_OUTPUT_ID,
    FakeEngine,
    Image,
    make_request,
    make_scheduler,
    scheduled,
    text,
)
from vlmx.engine.request import RequestStatus
from vlmx.sampling_params import SamplingParams


def greedy(max_tokens: int | None = 8, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def expected_output(n: int) -> list[int]:
    return list(range(FIRST_OUTPUT_ID, FIRST_OUTPUT_ID + n))


# -- continuous batching ----------------------------------------------------------------------


def test_max_num_seqs_bounds_the_batch_and_freed_seats_are_refilled():
    scheduler = make_scheduler(max_num_seqs=2)
    engine = FakeEngine(scheduler)
    max_tokens = {"r0": 2, "r1": 6, "r2": 3, "r3": 3, "r4": 3}
    requests = [
        make_request(rid, [text(6, start=100 * (i + 1))], params=greedy(n))
        for i, (rid, n) in enumerate(max_tokens.items())
    ]
    engine.add(*requests)

    first = engine.step()
    assert scheduled(first) == {"r0": 6, "r1": 6}
    assert [r.request_id for r in scheduler.waiting] == ["r2", "r3", "r4"]
    outputs = [first, *engine.run()]

    assert all(len(out.request_ids) <= 2 for out in outputs)
    # r0 finishes after 2 tokens; r2 takes its seat while r1 is still decoding.
    assert any(scheduled(out).keys() == {"r1", "r2"} for out in outputs)
    for request in requests:
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == expected_output(max_tokens[request.request_id])
    assert scheduler.kv_cache.num_free_blocks == 64
    scheduler.check_integrity()


def test_would_fill_step_once_waiting_prompts_fill_the_budget_or_one_runs():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    engine = FakeEngine(scheduler)
    assert not scheduler.would_fill_step()
    engine.add(make_request("r0", [text(10, start=100)], params=greedy(4)))
    assert not scheduler.would_fill_step()  # 10 of 16 tokens
    engine.add(make_request("r1", [text(6, start=200)], params=greedy(4)))
    assert scheduler.would_fill_step()  # 16 of 16
    engine.step()
    engine.step()
    assert not scheduler.waiting and scheduler.running
    assert scheduler.would_fill_step()  # running requests need their next step


def test_token_budget_bounds_each_step_and_chunks_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    engine = FakeEngine(scheduler)
    requests = [
        make_request(f"r{i}", [text(10, start=100 * (i + 1))], params=greedy(4)) for i in range(4)
    ]
    engine.add(*requests)

    out = engine.step()
    assert scheduled(out) == {"r0": 10, "r1": 6}  # r1's prompt is cut by the budget
    assert requests[0].num_output_tokens == 1 and requests[1].num_output_tokens == 0
    out = engine.step()  # running first (a decode, the rest of r1), then new prompts
    assert scheduled(out) == {"r0": 1, "r1": 4, "r2": 10, "r3": 1}
    assert [r.num_output_tokens for r in requests] == [2, 1, 1, 0]
    outputs = engine.run()

    assert all(out.total_num_scheduled_tokens <= 16 for out in outputs)
    assert all(r.output_token_ids == expected_output(4) for r in requests)
    scheduler.check_integrity()


# -- chunked prefill around images ------------------------------------------------------------


def test_chunk_boundary_inside_an_image_encodes_it_once():
    # prompt: [ t*6 | cat: 12 placeholders (6..17) | t*6 ], 10 tokens a step
    scheduler = make_scheduler(max_num_batched_tokens=10)
    engine = FakeEngine(scheduler)
    request = make_request("a", [text(6), Image("cat", 12), text(6, start=200)], params=greedy(2))
    engine.add(request)
    cache = scheduler.encoder_cache

    out = engine.step()  # tokens 0..9: the chunk ends inside the image, rows 0..3
    assert scheduled(out) == {"a": 10}
    assert out.encoder_inputs == {"a": [0]}
    assert cache.refs["cat"] == {"a"}  # still needed by the next chunk

    out = engine.step()  # tokens 10..19: rows 4..11 from the encoder cache
    assert scheduled(out) == {"a": 10}
    assert out.encoder_inputs == {}
    assert "cat" in cache.releasable  # last row consumed: released, kept for reuse

    engine.run()
    assert engine.num_encodes == {"cat": 1}
    assert request.output_token_ids == expected_output(2)
    scheduler.check_integrity()


def test_image_is_encoded_on_the_step_that_first_reaches_it():
    # prompt: [ t*10 | cat (10..17) | t*2 ]: the first chunk ends just before the image.
    scheduler = make_scheduler(max_num_batched_tokens=10)
    engine = FakeEngine(scheduler)
    engine.add(make_request("a", [text(10), Image("cat", 8), text(2, start=200)]))

    out = engine.step()
    assert scheduled(out) == {"a": 10} and out.encoder_inputs == {}
    assert not scheduler.encoder_cache.contains("cat")
    out = engine.step()
    assert scheduled(out) == {"a": 10} and out.encoder_inputs == {"a": [0]}
    engine.run()
    assert engine.num_encodes == {"cat": 1}
    scheduler.check_integrity()


def test_encoder_budget_cuts_the_chunk_just_before_an_image():
    # prompt: [ t*4 | x (4..9) | t*2 | y (12..17) | t*4 ]; the encoder may do 8 rows a step.
    scheduler = make_scheduler(encoder_budget=8)
    engine = FakeEngine(scheduler)
    request = make_request(
        "a", [text(4), Image("x", 6), text(2, start=200), Image("y", 6), text(4, start=300)]
    )
    engine.add(request)

    out = engine.step()
    assert out.encoder_inputs == {"a": [0]}
    assert scheduled(out) == {"a": 12}  # up to y's first placeholder, not into it
    out = engine.step()
    assert out.encoder_inputs == {"a": [1]}
    assert scheduled(out) == {"a": 10}
    engine.run()
    assert engine.num_encodes == {"x": 1, "y": 1}
    scheduler.check_integrity()


def test_full_encoder_cache_cuts_the_chunk_just_before_an_image():
    # The encoder cache (16 rows) holds a's image z (12 rows) while a consumes it; b's image w
    # (8 rows) must wait, and b's chunk stops just before it.
    scheduler = make_scheduler(max_num_batched_tokens=10, encoder_cache_size=16)
    engine = FakeEngine(scheduler)
    a = make_request("a", [Image("z", 12), text(4)], params=greedy(4))
    b = make_request("b", [text(3, start=200), Image("w", 8), text(3, start=300)])
    engine.add(a, b)

    out = engine.step()
    assert scheduled(out) == {"a": 10} and out.encoder_inputs == {"a": [0]}
    out = engine.step()
    assert scheduled(out) == {"a": 6, "b": 3}  # b: 3 text tokens, then w does not fit
    assert out.encoder_inputs == {}
    assert "z" in scheduler.encoder_cache.releasable  # a has consumed z
    out = engine.step()  # now w fits by evicting z
    assert out.encoder_inputs == {"b": [0]}
    assert out.freed_mm_hashes == ["z"]
    assert scheduled(out)["b"] == 9
    engine.run()
    assert scheduler.encoder_cache.num_used <= 16
    scheduler.check_integrity()


@pytest.mark.parametrize("chunk_images", [True, False])
def test_chunk_images_false_keeps_an_image_span_in_one_step(chunk_images):
    # prompt: [ t*6 | cat (6..13) | t*4 ], 10 tokens a step
    scheduler = make_scheduler(max_num_batched_tokens=10, chunk_images=chunk_images)
    engine = FakeEngine(scheduler)
    request = make_request("a", [text(6), Image("cat", 8), text(4, start=200)], params=greedy(2))
    engine.add(request)
    ranges = []
    while scheduler.has_unfinished_requests():
        start = request.num_computed_tokens
        out = engine.step()
        ranges.append((start, start + scheduled(out)["a"]))

    prefill = [r for r in ranges if r[0] < request.num_prompt_tokens]
    if chunk_images:
        assert prefill == [(0, 10), (10, 18)]
    else:
        assert prefill == [(0, 6), (6, 16), (16, 18)]  # cut before the image, then all of it
        for start, end in ranges:
            assert end <= 6 or start >= 14 or (start <= 6 and end >= 14)
    assert engine.num_encodes == {"cat": 1}
    scheduler.check_integrity()


# -- preemption -------------------------------------------------------------------------------


def test_newest_request_is_preempted_when_the_kv_pool_runs_out():
    # 6 blocks of 4: a and b (7-token prompts, 8 outputs each) fit until both need a 4th block.
    scheduler = make_scheduler(num_blocks=6, max_num_seqs=2)
    engine = FakeEngine(scheduler)
    a = make_request("a", [text(7, start=100)])
    b = make_request("b", [text(7, start=200)])
    c = make_request("c", [text(5, start=300)], params=greedy(2))
    engine.add(a, b, c)

    while not scheduler.num_preemptions:
        out = engine.step()
    assert out.preempted_request_ids == ["b"]  # the newest running request
    assert scheduled(out) == {"a": 1}
    assert list(scheduler.waiting) == [b, c]  # back at the front of the queue
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0
    assert scheduler.kv_cache.block_ids("b") == []
    assert b.output_token_ids == expected_output(6)  # its output so far is kept
    scheduler.check_integrity()

    engine.run()
    for request, n in ((a, 8), (b, 8), (c, 2)):
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == expected_output(n)
    assert scheduler.kv_cache.num_free_blocks == 6
    scheduler.check_integrity()


@pytest.mark.parametrize("enable_caching", [True, False])
def test_tiny_kv_pool_preempts_and_every_request_finishes(enable_caching):
    rng = random.Random(1)
    scheduler = make_scheduler(
        num_blocks=12,
        enable_caching=enable_caching,
        max_num_batched_tokens=16,
        encoder_cache_size=64,  # all images at once: only the KV pool is short here
    )
    engine = FakeEngine(scheduler)
    images = [Image("cat", 6), Image("dog", 9), Image("owl", 4)]
    system = text(5, start=100)
    requests = []
    for i in range(10):
        segments = [system] if rng.random() < 0.7 else []
        for image in rng.sample(images, rng.randint(0, 2)):
            segments += [text(rng.randint(0, 3), start=200), image]
        segments.append(text(rng.randint(1, 4), start=300 + 10 * i))
        max_tokens = rng.randint(1, 12)
        requests.append(make_request(f"r{i}", segments, params=greedy(max_tokens)))
    engine.add(*requests)

    engine.run()
    assert scheduler.num_preemptions > 0
    for request in requests:
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == expected_output(request.max_tokens)
    assert scheduler.kv_cache.num_free_blocks == 12
    assert not scheduler.encoder_cache.refs
    scheduler.check_integrity()


# -- prefix cache and encoder cache together --------------------------------------------------


def test_prefix_hit_sets_num_cached_tokens_and_skips_a_covered_image():
    scheduler = make_scheduler(encoder_cache_size=16)
    engine = FakeEngine(scheduler)
    system = text(8)
    a = make_request("a", [system, Image("cat", 8), text(4, start=200)], params=greedy(2))
    engine.add(a)
    engine.run()
    assert a.num_cached_tokens == 0
    # Another image pushes cat out of the encoder cache (16 rows: 8 + 12 do not fit).
    engine.add(make_request("d", [text(3, start=700), Image("dog", 12), text(2, start=710)]))
    engine.run()
    assert not scheduler.encoder_cache.contains("cat")

    # Same system prompt and image: the hit covers both (4 blocks), so cat is not needed.
    b = make_request("b", [system, Image("cat", 8), text(4, start=300)], params=greedy(2))
    engine.add(b)
    out = engine.step()
    assert b.num_cached_tokens == 16
    assert scheduled(out) == {"b": 4}
    assert out.encoder_inputs == {}
    assert not scheduler.encoder_cache.contains("cat") and "cat" not in scheduler.encoder_cache.refs
    engine.run()
    assert engine.num_encodes == {"cat": 1, "dog": 1}
    scheduler.check_integrity()


def test_prefix_hit_ending_inside_an_image_still_encodes_it():
    scheduler = make_scheduler(encoder_cache_size=16)
    engine = FakeEngine(scheduler)
    # cat spans 8..13; block 3 (12..15) holds cat's last 2 rows and the first question tokens.
    a = make_request("a", [text(8), Image("cat", 6), text(6, start=200)], params=greedy(2))
    engine.add(a)
    engine.run()
    engine.add(make_request("d", [text(3, start=700), Image("dog", 12), text(2, start=710)]))
    engine.run()
    assert not scheduler.encoder_cache.contains("cat")

    b = make_request("b", [text(8), Image("cat", 6), text(6, start=300)], params=greedy(2))
    engine.add(b)
    out = engine.step()
    assert b.num_cached_tokens == 12  # cat's rows 0..3 are cached KV, rows 4..5 are not
    assert out.encoder_inputs == {"b": [0]}
    engine.run()
    assert engine.num_encodes == {"cat": 2, "dog": 1}
    scheduler.check_integrity()


def test_blocks_of_a_request_scheduled_this_step_are_hit_by_the_next():
    scheduler = make_scheduler()
    engine = FakeEngine(scheduler)
    system = text(8)
    a = make_request("a", [system, Image("cat", 8), text(4, start=200)], params=greedy(3))
    b = make_request("b", [system, Image("cat", 8), text(4, start=300)], params=greedy(3))
    engine.add(a, b)

    out = engine.step()
    assert scheduled(out) == {"a": 20, "b": 4}
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 16)
    assert out.encoder_inputs == {"a": [0]}  # b's image is covered by its hit
    engine.run()
    assert engine.num_encodes == {"cat": 1}
    scheduler.check_integrity()


def test_same_image_in_two_requests_of_one_step_is_encoded_once():
    scheduler = make_scheduler()
    engine = FakeEngine(scheduler)
    # Different text before the image: no prefix hit, both compute the image's KV.
    a = make_request("a", [text(4, start=100), Image("cat", 8), text(2, start=300)])
    b = make_request("b", [text(4, start=200), Image("cat", 8), text(2, start=300)])
    engine.add(a, b)

    out = engine.step()
    assert scheduled(out) == {"a": 14, "b": 14}
    assert out.encoder_inputs == {"a": [0]}
    assert scheduler.encoder_cache.num_used == 8
    engine.run()
    assert engine.num_encodes == {"cat": 1}
    assert "cat" in scheduler.encoder_cache.releasable
    scheduler.check_integrity()


def test_a_later_image_already_cached_does_not_block_an_earlier_one():
    # The encoder cache holds 16 rows; each image needs 12, so the request must encode `first`,
    # consume it, then bring `later` back. `later` is cached (unreferenced) from request r0.
    # Each image fits the cache alone, which is all the engine's input check asks for.
    scheduler = make_scheduler(encoder_cache_size=16)
    engine = FakeEngine(scheduler)
    engine.add(make_request("r0", [text(3, start=100), Image("later", 12), text(3, start=150)]))
    engine.run()
    assert "later" in scheduler.encoder_cache.releasable

    r1 = make_request(
        "r1",
        [
            text(3, start=200),
            Image("first", 12),
            text(3, start=250),
            Image("later", 12),
            text(3, start=260),
        ],
    )
    engine.add(r1)
    engine.run(max_steps=50)
    assert r1.output_token_ids == expected_output(8)
    scheduler.check_integrity()


def test_a_preempted_request_resumes_when_its_later_image_is_still_cached():
    # r1's images x (3 rows) and y (6 rows) never fit the encoder cache (6 rows) together. r1 is
    # preempted after it encoded y; on resuming from token 0 it must encode x again while y,
    # unreferenced, is still cached.
    scheduler = make_scheduler(
        num_blocks=4, enable_caching=False, max_num_batched_tokens=7, encoder_cache_size=6
    )
    engine = FakeEngine(scheduler)
    r0 = make_request("r0", [text(2, start=300)], params=greedy(6))
    r1 = make_request("r1", [Image("x", 3), Image("y", 6), text(1, start=400)], params=greedy(6))
    engine.add(r0, r1)
    engine.run(max_steps=50)
    assert scheduler.num_preemptions >= 1
    assert r1.output_token_ids == expected_output(6)
    scheduler.check_integrity()


def test_a_preemption_that_frees_encoder_space_does_not_empty_the_step():
    # Step 1: old computes up to its image B (8 rows), which does not fit next to A (consumed,
    # unreferenced) and c (held by new, halfway through it). Step 2: old waits for encoder
    # space; new needs a 6th KV block that does not exist and is preempted, which releases c.
    # old could now run, but the step comes back empty, and LLMEngine.step treats an empty step
    # as "KV cache too small for a request" although every request fits.
    scheduler = make_scheduler(num_blocks=5, max_num_batched_tokens=16, encoder_cache_size=12)
    engine = FakeEngine(scheduler)
    old = make_request(
        "old",
        [text(2, start=100), Image("A", 6), text(2, start=110), Image("B", 8), text(2, start=120)],
        params=greedy(1),  # 20 tokens of KV: the 5 blocks
    )
    new = make_request("new", [text(1, start=200), Image("c", 6), text(3, start=210)])
    engine.add(old, new)
    out = engine.step()
    assert scheduled(out) == {"old": 10, "new": 6}
    engine.run(max_steps=50)
    assert scheduler.num_preemptions >= 1
    assert old.output_token_ids == expected_output(1)
    assert new.output_token_ids == expected_output(8)
    scheduler.check_integrity()


def random_workload(seed: int) -> tuple[dict, list]:
    """A small random scheduler config and requests that each fit it alone: shared system
    prompts and images, images repeated inside a prompt, LoRA ids, tight KV and encoder caches,
    chunk_images on and off."""
    rng = random.Random(seed)
    sizes = {f"img{i}": rng.randint(2, 12) for i in range(5)}
    largest = max(sizes.values())
    chunk_images = rng.random() < 0.7
    block_size = rng.choice([2, 4, 8])
    encoder_cache_size = rng.randint(largest, 40)
    config = dict(
        num_blocks=rng.randint(8, 30),
        block_size=block_size,
        enable_caching=rng.random() < 0.8,
        max_num_seqs=rng.randint(1, 5),
        max_num_batched_tokens=rng.randint(4 if chunk_images else largest, 24),
        max_model_len=200,
        encoder_cache_size=encoder_cache_size,
        encoder_budget=rng.randint(largest, encoder_cache_size),
        chunk_images=chunk_images,
    )
    system = text(rng.randint(1, 6), start=100)
    requests = []
    for i in range(rng.randint(1, 8)):
        segments = [system] if rng.random() < 0.6 else []
        for name in rng.choices(list(sizes), k=rng.randint(0, 3)):
            segments += [text(rng.randint(0, 3), start=200), Image(name, sizes[name])]
        segments.append(text(rng.randint(1, 4), start=300 + 10 * i))
        request = make_request(
            f"r{i}", segments, params=greedy(rng.randint(1, 10)), lora_int_id=rng.choice([0, 0, 1])
        )
        # The KV of all its tokens but the last sampled one fits the pool.
        if (
            -(-(request.num_prompt_tokens + request.max_tokens - 1) // block_size)
            <= config["num_blocks"]
        ):
            requests.append(request)
    return config, requests


def test_random_workloads_finish_with_consistent_caches():
    failures = []
    for seed in range(150):
        config, requests = random_workload(seed)
        scheduler = make_scheduler(**config)
        engine = FakeEngine(scheduler)
        engine.add(*requests)
        try:
            engine.run(max_steps=2000)
            for request in requests:
                assert request.status == RequestStatus.FINISHED_LENGTH
                assert request.output_token_ids == expected_output(request.max_tokens)
            assert scheduler.kv_cache.num_free_blocks == config["num_blocks"]
            assert not scheduler.encoder_cache.refs
            scheduler.check_integrity()
        except AssertionError as e:
            failures.append(f"seed {seed}: {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} of 150 workloads failed, e.g. " + "; ".join(failures[:3])


# -- stop conditions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "script", "expected", "status", "stop_reason"),
    [
        pytest.param(greedy(10), [11, 12, EOS_ID, 13], 3, "FINISHED_STOPPED", None, id="eos"),
        pytest.param(
            greedy(10, min_tokens=3), [EOS_ID] * 4, 3, "FINISHED_STOPPED", None, id="eos-min"
        ),
        pytest.param(
            greedy(10, stop_token_ids=[42]), [11, 42, 12], 2, "FINISHED_STOPPED", 42, id="stop-id"
        ),
        pytest.param(
            greedy(10, stop_token_ids=[42], min_tokens=3),
            [42, 42, 42, 12],
            3,
            "FINISHED_STOPPED",
            42,
            id="stop-id-min",
        ),
        pytest.param(greedy(4), [11] * 10, 4, "FINISHED_LENGTH", None, id="max-tokens"),
        pytest.param(
            greedy(4, ignore_eos=True), [EOS_ID] * 10, 4, "FINISHED_LENGTH", None, id="ignore-eos"
        ),
        pytest.param(
            greedy(6, ignore_eos=True, stop_token_ids=[42]),
            [EOS_ID, 42, 11],
            2,
            "FINISHED_STOPPED",
            42,
            id="ignore-eos-keeps-stop-ids",
        ),
    ],
)
def test_stop_conditions(params, script, expected, status, stop_reason):
    scheduler = make_scheduler()
    engine = FakeEngine(scheduler, sample=lambda r: script[r.num_output_tokens])
    request = make_request("a", [text(5)], params=params)
    engine.add(request)
    engine.run()
    assert request.output_token_ids == script[:expected]
    assert request.status == RequestStatus[status]
    assert request.stop_reason == stop_reason
    assert scheduler.kv_cache.num_free_blocks == 64
    scheduler.check_integrity()


def test_max_model_len_stops_a_request():
    scheduler = make_scheduler(max_model_len=14)
    engine = FakeEngine(scheduler)
    # max_tokens not capped by the engine here: the scheduler's own length check must stop it.
    request = make_request("a", [text(10)], params=greedy(None), max_tokens=100)
    engine.add(request)
    engine.run()
    assert request.num_tokens == 14
    assert request.output_token_ids == expected_output(4)
    assert request.status == RequestStatus.FINISHED_LENGTH
    scheduler.check_integrity()


# -- finishing and aborting -------------------------------------------------------------------


def test_abort_frees_blocks_and_encoder_references():
    scheduler = make_scheduler(max_num_batched_tokens=10, max_num_seqs=1)
    engine = FakeEngine(scheduler)
    a = make_request("a", [text(6), Image("cat", 12), text(6, start=200)])
    b = make_request("b", [text(6, start=300)])
    engine.add(a, b)
    engine.step()  # a is inside its image; b waits for a seat
    assert scheduler.encoder_cache.refs["cat"] == {"a"}
    assert scheduler.kv_cache.block_ids("a")

    scheduler.finish_request(a, RequestStatus.FINISHED_ABORTED)
    assert a.status == RequestStatus.FINISHED_ABORTED and a.status.finish_reason == "abort"
    assert a not in scheduler.running
    assert scheduler.kv_cache.block_ids("a") == []
    assert scheduler.kv_cache.num_free_blocks == 64
    assert "cat" in scheduler.encoder_cache.releasable
    scheduler.check_integrity()

    scheduler.finish_request(a, RequestStatus.FINISHED_ABORTED)  # twice: no-op
    scheduler.finish_request(b, RequestStatus.FINISHED_ABORTED)  # a waiting request
    assert not scheduler.has_unfinished_requests()
    scheduler.check_integrity()


def test_abort_while_the_step_runs_drops_its_result():
    scheduler = make_scheduler()
    a = make_request("a", [text(6), Image("cat", 4)])
    scheduler.add_request(a)
    out = scheduler.schedule()
    assert scheduled(out) == {"a": 10}
    scheduler.finish_request(a, RequestStatus.FINISHED_ABORTED)
    updated = scheduler.update_from_output(out, [FIRST_OUTPUT_ID])
    assert updated == []
    assert a.output_token_ids == [] and a.num_computed_tokens == 0
    assert scheduler.kv_cache.num_free_blocks == 64
    assert not scheduler.encoder_cache.refs
    scheduler.check_integrity()


def test_finished_request_releases_everything():
    scheduler = make_scheduler()
    engine = FakeEngine(scheduler, sample=lambda r: EOS_ID)
    request = make_request("a", [text(6), Image("cat", 8), text(2, start=200)])
    engine.add(request)
    engine.run()
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [EOS_ID]
    assert scheduler.kv_cache.num_free_blocks == 64
    assert "a" not in scheduler.kv_cache.req_blocks
    assert not scheduler.encoder_cache.refs
    scheduler.check_integrity()
