"""Fake requests and a fake model step for the engine's bookkeeping tests (no model, no tensors),
and `check_idle` for tests of a real `LLM`.

A prompt is written as segments: lists of text token ids, and `Image(mm_hash, length)` for an
image, which expands to `length` copies of the one placeholder id that every image shares (as
a real processor does), so that only the hash tells two images apart:

```
make_request("a", [text(4), Image("cat", 6), text(2)])
prompt ids:  [t0 t1 t2 t3 | P P P P P P | t4 t5]     MMFeature("cat", PlaceholderRange(4, 6))
```
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from vlmx.config import SchedulerConfig
from vlmx.engine.encoder_cache import EncoderCacheManager
from vlmx.engine.kv_cache import KVCacheManager
from vlmx.engine.request import Request, RequestStatus
from vlmx.engine.scheduler import Scheduler
from vlmx.multimodal.inputs import MMFeature, PlaceholderRange
from vlmx.sampling_params import SamplingParams
from vlmx.step import SchedulerOutput
from vlmx.worker.input_batch import InputBatch

PLACEHOLDER_ID = 9  # the image placeholder token, identical for every image
EOS_ID = 2
FIRST_OUTPUT_ID = 5000  # default fake samples: 5000, 5001, ... (never EOS, never a prompt id)


@dataclass(frozen=True)
class Image:
    mm_hash: str
    length: int  # placeholder tokens == embeddings


def text(n: int, start: int = 100) -> list[int]:
    """`n` distinct text token ids from `start` on."""
    return list(range(start, start + n))


def make_request(
    request_id: str,
    segments: list[list[int] | Image],
    *,
    params: SamplingParams | None = None,
    max_tokens: int | None = None,
    lora_int_id: int = 0,
    eos_token_ids: set[int] | None = None,
) -> Request:
    """A Request whose prompt is `segments` laid end to end, one MMFeature per `Image`.

    `max_tokens` defaults to `params.max_tokens` (the engine would cap it by max_model_len).
    """
    params = params or SamplingParams(temperature=0.0, max_tokens=8)
    token_ids: list[int] = []
    features: list[MMFeature] = []
    for segment in segments:
        if isinstance(segment, Image):
            placeholder = PlaceholderRange(offset=len(token_ids), length=segment.length)
            features.append(MMFeature(mm_hash=segment.mm_hash, placeholder=placeholder))
            token_ids.extend([PLACEHOLDER_ID] * segment.length)
        else:
            token_ids.extend(segment)
    return Request(
        request_id=request_id,
        prompt=None,
        prompt_token_ids=token_ids,
        mm_features=features,
        sampling_params=params,
        eos_token_ids={EOS_ID} if eos_token_ids is None else eos_token_ids,
        max_tokens=max_tokens if max_tokens is not None else (params.max_tokens or 1 << 30),
        lora_int_id=lora_int_id,
    )


def make_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    enable_caching: bool = True,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 512,
    encoder_cache_size: int = 64,
    encoder_budget: int | None = None,
    chunk_images: bool = True,
) -> Scheduler:
    """A Scheduler over a real KVCacheManager and EncoderCacheManager, config built by hand."""
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        encoder_cache_size=encoder_cache_size,
        encoder_budget=encoder_cache_size if encoder_budget is None else encoder_budget,
    )
    return Scheduler(
        config,
        KVCacheManager(num_blocks, block_size, enable_caching),
        EncoderCacheManager(encoder_cache_size),
        chunk_images=chunk_images,
    )


def default_sample(request: Request) -> int:
    return FIRST_OUTPUT_ID + request.num_output_tokens


def token_keys(request: Request) -> list[tuple]:
    """What the KV of each position depends on besides the prefix: its token id, or for a
    placeholder, its image and row (the id is the same for every image)."""
    keys: list[tuple] = [("tok", t) for t in request.all_token_ids]
    for feature in request.mm_features:
        p = feature.placeholder
        for i in range(p.length):
            keys[p.offset + i] = ("img", feature.mm_hash, i)
    return keys


def prefix_keys(request: Request, num_tokens: int) -> list[int]:
    """Per position, a key of the whole prefix up to it (and the LoRA): the KV at position p
    is right only if it was computed from exactly this prefix."""
    out, key = [], hash(("lora", request.lora_int_id))
    for token_key in token_keys(request)[:num_tokens]:
        key = hash((key, token_key))
        out.append(key)
    return out


class FakeEngine:
    """The engine loop with the model replaced by bookkeeping that checks what a model would
    read. Each step:

    - drops `freed_mm_hashes`, then "encodes" `encoder_inputs`: an image must not be encoded
      while its output is still held, nor twice in one step;
    - every image whose placeholder span the step touches must have its encoder output;
    - writes, into a paged store, a key of each scheduled token's whole prefix at its slot
      (block table + offset), then checks that every position a sequence attends to,
      0..num_computed_tokens + n - 1, holds its own prefix's key: a bad prefix hit, a block
      freed or evicted while still used, or a lost write shows up here;
    - samples a token for a request exactly when the step reaches its last known token
      (`num_computed_tokens + n == num_tokens`), else None, as the model runner does;
    - keeps a worker's `InputBatch` from the step records alone, and checks that it holds
      what the engine holds: each scheduled request's blocks, computed tokens and token ids
      (the worker appends the samples itself);
    - calls `update_from_output`, then `check_integrity()`.
    """

    def __init__(
        self, scheduler: Scheduler, sample: Callable[[Request], int] = default_sample
    ) -> None:
        self.scheduler = scheduler
        self.sample = sample
        self.block_size = scheduler.kv_cache.block_size
        self.encoder_outputs: set[str] = set()
        self.num_encodes: Counter[str] = Counter()  # mm_hash -> times encoded
        self.kv: dict[tuple[int, int], int] = {}  # (block id, slot in block) -> prefix key
        self.outputs: list[SchedulerOutput] = []
        self.worker = InputBatch(
            self.block_size,
            frozenset([EOS_ID]),
            uses_mrope=False,
            bidirectional_images=not scheduler.chunk_images,
            make_generator=lambda seed: None,
        )

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def step(self) -> SchedulerOutput:
        scheduler = self.scheduler
        out = scheduler.schedule()
        self.outputs.append(out)
        requests = scheduler.scheduled_requests(out)
        assert out.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        assert len(requests) <= scheduler.config.max_num_seqs
        assert len(scheduler.running) <= scheduler.config.max_num_seqs
        assert len(set(out.request_ids)) == len(out.request_ids)
        assert all(n > 0 for n in out.num_scheduled_tokens)
        assert all(r.status == RequestStatus.RUNNING for r in requests)
        assert set(out.encoder_inputs) <= set(out.request_ids)

        self._run_encoder(out, requests)
        self._run_attention(out, requests)
        states = self._check_worker(out, requests)
        sampled = [
            self.sample(r) if r.num_computed_tokens + n == r.num_tokens else None
            for r, n in zip(requests, out.num_scheduled_tokens)
        ]
        for state, token_id in zip(states, sampled):
            if token_id is not None:
                state.token_ids.append(token_id)
        scheduler.update_from_output(out, sampled)
        scheduler.check_integrity()
        assert self.encoder_outputs == set(scheduler.encoder_cache.entries)
        return out

    def _check_worker(self, out: SchedulerOutput, requests: list[Request]) -> list:
        """The worker's state, from the records alone, equals the engine's."""
        states = self.worker.update(out)
        kv = self.scheduler.kv_cache
        for request, state in zip(requests, states):
            rid = request.request_id
            assert self.worker.block_table.row(rid).tolist() == kv.block_ids(rid), rid
            assert state.num_computed_tokens == request.num_computed_tokens, rid
            assert state.token_ids == request.all_token_ids, rid
        assert self.worker.requests.keys() >= set(out.request_ids)
        return states

    def _run_encoder(self, out: SchedulerOutput, requests: list[Request]) -> None:
        self.encoder_outputs -= set(out.freed_mm_hashes)
        by_id = {r.request_id: r for r in requests}
        for request_id, indexes in out.encoder_inputs.items():
            for idx in indexes:
                mm_hash = by_id[request_id].mm_features[idx].mm_hash
                assert mm_hash not in self.encoder_outputs, f"{mm_hash} encoded while cached"
                self.encoder_outputs.add(mm_hash)
                self.num_encodes[mm_hash] += 1
        for request, n in zip(requests, out.num_scheduled_tokens):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            for feature in request.mm_features:
                p = feature.placeholder
                if p.offset < end and p.end > start:
                    assert feature.mm_hash in self.encoder_outputs, (
                        f"{request.request_id} reads {feature.mm_hash} rows "
                        f"{max(start, p.offset) - p.offset}..{min(end, p.end) - p.offset - 1} "
                        "but its encoder output is gone"
                    )

    def _run_attention(self, out: SchedulerOutput, requests: list[Request]) -> None:
        bs = self.block_size
        tables, keys = [], []
        for request, n in zip(requests, out.num_scheduled_tokens):
            end = request.num_computed_tokens + n
            table = self.scheduler.kv_cache.block_ids(request.request_id)
            assert len(table) * bs >= end, (request.request_id, len(table), end)
            tables.append(table)
            keys.append(prefix_keys(request, end))
        # Every layer stores the whole batch's K/V before any sequence attends.
        for request, n, table, key in zip(requests, out.num_scheduled_tokens, tables, keys):
            for pos in range(request.num_computed_tokens, request.num_computed_tokens + n):
                self.kv[table[pos // bs], pos % bs] = key[pos]
        for request, n, table, key in zip(requests, out.num_scheduled_tokens, tables, keys):
            for pos in range(request.num_computed_tokens + n):
                assert self.kv.get((table[pos // bs], pos % bs)) == key[pos], (
                    f"{request.request_id} attends to a wrong KV at position {pos}"
                )

    def run(self, max_steps: int = 1000) -> list[SchedulerOutput]:
        """Step until no request is left. A step that schedules nothing while requests remain
        is the engine's "no progress" error; it fails here too."""
        outputs = []
        while self.scheduler.has_unfinished_requests():
            assert len(outputs) < max_steps, "the scheduler did not finish its requests"
            out = self.step()
            assert not out.is_empty, (
                "scheduler made no progress: "
                f"preempted={out.preempted_request_ids} "
                f"waiting={[r.request_id for r in self.scheduler.waiting]} "
                f"running={[(r.request_id, r.num_computed_tokens) for r in self.scheduler.running]}"
            )
            outputs.append(out)
        return outputs


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    """Request id -> tokens scheduled in this step."""
    return dict(zip(out.request_ids, out.num_scheduled_tokens))


def check_idle(llm) -> None:
    """A real `LLM` after a batch: no request, detokenizer or prompt left, caches consistent."""
    engine = llm.llm_engine
    engine.scheduler.check_integrity()
    assert not engine.has_unfinished_requests()
    outputs = engine.output_processor
    assert not engine.requests and not outputs.detokenizers and not outputs.prompts
    assert not outputs.parents
