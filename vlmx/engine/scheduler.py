"""Continuous batching under one token budget per step, with chunked prefill and images.

Each step takes running requests first (decodes and unfinished prefills, oldest first), then
waiting ones, until `max_num_batched_tokens` or `max_num_seqs` is reached. A prefill longer than
the budget is chunked; a chunk may end inside an image's placeholder span, since the image is
encoded once, on the step that first reaches it, and its embeddings stay in the encoder cache
until the request has consumed them:

```
prompt:   [ text | <vs> P P P P P P P P <ve> | text ]
step 1:   [ text | <vs> P P P ]                        encode image, use rows 0..2
step 2:                      [ P P P P P <ve> | te ]   rows 3..7 from the encoder cache
```

When the KV pool runs out, the most recently admitted running request is preempted: its blocks
are freed and it returns to the front of the queue to be recomputed later.

Each step goes to the workers as a `vlmx.step.SchedulerOutput` of plain records: a request in
full on its first step, then only its computed-token count and new blocks.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from vlmx.config import SchedulerConfig
from vlmx.engine.encoder_cache import EncoderCacheManager
from vlmx.engine.kv_cache import KVCacheManager
from vlmx.engine.request import Request, RequestStatus
from vlmx.step import NewRequestData, SchedulerOutput

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        encoder_cache: EncoderCacheManager,
        chunk_images: bool = True,
        max_loras: int | None = None,
    ) -> None:
        self.config = config
        # Distinct LoRA adapters one step may hold (None: LoRA off): a waiting request whose
        # adapter would be one more than the running requests hold waits.
        self.max_loras = max_loras
        self.kv_cache = kv_cache
        self.encoder_cache = encoder_cache
        # False for families whose image tokens attend to each other bidirectionally: an
        # image's placeholder span must then be computed in one step.
        self.chunk_images = chunk_images
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.num_preemptions = 0
        self._finished_ids: list[str] = []  # since the last step (the workers drop them)

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def would_fill_step(self) -> bool:
        """Whether stepping now beats waiting for more requests: some request is running (it
        needs its next step), or the waiting ones have prompt tokens for a full step."""
        if self.running:
            return True
        budget = self.config.max_num_batched_tokens
        for request in self.waiting:
            budget -= request.num_tokens - request.num_computed_tokens
            if budget <= 0:
                return True
        return False

    # -- scheduling ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        preempted: list[str] = []
        out = self._schedule_once(preempted)
        # A step that only preempted has freed blocks and encoder space that requests skipped
        # earlier in it could use: plan again. Each round shrinks `running`, so this ends.
        while out.is_empty and preempted:
            num_preempted = len(preempted)
            out = self._schedule_once(preempted)
            if len(preempted) == num_preempted:
                break
        out.preempted_request_ids = preempted
        out.finished_request_ids, self._finished_ids = self._finished_ids, []
        out.freed_mm_hashes = self.encoder_cache.take_freed()
        return out

    def _schedule_once(self, preempted: list[str]) -> SchedulerOutput:
        token_budget = self.config.max_num_batched_tokens
        encoder_budget = self.config.encoder_budget
        out = SchedulerOutput()
        num_preempted = len(preempted)

        i = 0
        while i < len(self.running) and token_budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, token_budget)
            to_encode, num_new, encoder_cost = self._plan_encoder(
                request, request.num_computed_tokens, num_new, encoder_budget
            )
            if num_new <= 0:
                i += 1
                continue
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                self._add_to_step(out, request, to_encode, num_new, first=False, resumed=False)
                encoder_budget -= encoder_cost
                token_budget -= num_new
                i += 1

        while (
            self.waiting
            and token_budget > 0
            and len(preempted) == num_preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            if not self._lora_fits(request):
                break
            hits, num_hit_tokens = self.kv_cache.get_computed_blocks(request)
            num_computed = request.num_computed_tokens + num_hit_tokens
            num_new = min(request.num_tokens - num_computed, token_budget)
            to_encode, num_new, encoder_cost = self._plan_encoder(
                request, num_computed, num_new, encoder_budget
            )
            if num_new <= 0:
                break
            if not self.kv_cache.allocate_slots(request, num_new, hits):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_computed
            first = request.num_cached_tokens < 0  # else scheduled before: back from preemption
            if first:
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.monotonic()
            self.running.append(request)
            self._add_to_step(out, request, to_encode, num_new, first=first, resumed=not first)
            encoder_budget -= encoder_cost
            token_budget -= num_new
        return out

    def _lora_fits(self, request: Request) -> bool:
        """Whether running `request` keeps the running adapters within `max_loras`."""
        if self.max_loras is None or not request.lora_int_id:
            return True
        running = {r.lora_int_id for r in self.running if r.lora_int_id}
        return request.lora_int_id in running or len(running) < self.max_loras

    def _add_to_step(
        self,
        out: SchedulerOutput,
        request: Request,
        to_encode: list[int],
        num_new: int,
        first: bool,
        resumed: bool,
    ) -> None:
        """Add `request` to the step, and its record: in full on its first step, else only
        what changed (a resumed request's new blocks are all its blocks)."""
        self._commit_encoder(request, to_encode, num_new)
        request_id = request.request_id
        if to_encode:
            out.encoder_inputs[request_id] = to_encode
        out.request_ids.append(request_id)
        out.num_scheduled_tokens.append(num_new)
        new_block_ids = self.kv_cache.take_new_block_ids(request_id)
        if first:
            out.new_requests.append(
                NewRequestData(
                    request_id=request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    mm_features=request.mm_features,
                    sampling_params=request.sampling_params,
                    block_ids=new_block_ids,
                    num_computed_tokens=request.num_computed_tokens,
                    mrope_positions=request.mrope_positions,
                    mrope_position_delta=request.mrope_position_delta,
                    lora_int_id=request.lora_int_id,
                    lora_request=request.lora_request,
                )
            )
        else:
            out.cached_requests.append(
                request_id, request.num_computed_tokens, new_block_ids, resumed
            )

    def _plan_encoder(
        self, request: Request, num_computed: int, num_new: int, budget: int
    ) -> tuple[list[int], int, int]:
        """Images to encode for tokens num_computed..num_computed+num_new-1, and how many of
        those tokens can be scheduled (cut before an image that cannot be had now).

        Images of the chunk that are cached but unreferenced get pinned by the commit, so they
        count against the space that new encodings may take.
        """
        if num_computed >= request.mm_end:  # every image already consumed (decode steps)
            return [], num_new, 0
        cache = self.encoder_cache
        to_encode: list[int] = []
        new_hashes: set[str] = set()
        cost = 0  # embeddings to encode this step
        pinned = 0  # embeddings of releasable entries this chunk will pin
        pinned_hashes: set[str] = set()
        end = num_computed + num_new
        for idx, feature in enumerate(request.mm_features):
            p = feature.placeholder
            if p.offset >= end:
                break
            if p.end <= num_computed:
                continue  # consumed by earlier steps
            if not self.chunk_images and p.end > end:
                return to_encode, p.offset - num_computed, cost  # keep the span in one step
            h = feature.mm_hash
            if h in new_hashes or h in pinned_hashes:
                continue
            if cache.contains(h):
                size = cache.releasable.get(h, 0)
                if size and cost + pinned + size > cache.num_free():
                    return to_encode, p.offset - num_computed, cost
                pinned += size
                pinned_hashes.add(h)
                continue
            if cost + p.length > budget or cost + pinned + p.length > cache.num_free():
                return to_encode, p.offset - num_computed, cost  # stop before this image
            to_encode.append(idx)
            new_hashes.add(h)
            cost += p.length
        return to_encode, num_new, cost

    def _commit_encoder(self, request: Request, to_encode: list[int], num_new: int) -> None:
        cache = self.encoder_cache
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
        if start >= request.mm_end:
            return  # no image left to reference or encode
        # References first, on the cached images this chunk uses, so that the allocations
        # below cannot evict them.
        for feature in request.mm_features:
            p = feature.placeholder
            if p.offset < end and p.end > start and cache.contains(feature.mm_hash):
                cache.add_ref(feature.mm_hash, request.request_id)
        for idx in to_encode:
            feature = request.mm_features[idx]
            if not cache.contains(feature.mm_hash):
                cache.allocate(feature.mm_hash, feature.num_embeds, request.request_id)

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        logger.debug("preempted %s (KV cache full)", request.request_id)

    def _release(self, request: Request) -> None:
        self.kv_cache.free(request)
        self.encoder_cache.release_all(request.request_id, [f.mm_hash for f in request.mm_features])

    # -- after the step -------------------------------------------------------------------

    def scheduled_requests(self, output: SchedulerOutput) -> list[Request | None]:
        """The requests of a step, in batch order (None for those that finished since)."""
        requests = self.requests
        return [requests.get(request_id) for request_id in output.request_ids]

    def advance(self, output: SchedulerOutput) -> None:
        """Async scheduling: count a launched step's tokens as computed before its samples are
        read, and reserve the next token of each request that samples and may go on, so that
        the next step can be scheduled now. `update_from_output(..., advanced=True)` then fills
        the reserved tokens in (and finishes requests that stopped)."""
        for request, num_new in zip(self.scheduled_requests(output), output.num_scheduled_tokens):
            if request is None:
                continue
            samples = request.num_computed_tokens + num_new == request.num_tokens
            self._advance(request, num_new)
            # NOTE: no reservation when this sample is certainly the last (length limits).
            if (
                samples
                and request.num_output_tokens + 1 < request.max_tokens
                and request.num_tokens + 1 < self.config.max_model_len
            ):
                request.append_placeholder()

    def _advance(self, request: Request, num_new: int) -> None:
        before = request.num_computed_tokens
        request.num_computed_tokens += num_new
        if before >= request.mm_end:
            return  # no image span left to release
        for feature in request.mm_features:
            if before < feature.placeholder.end <= request.num_computed_tokens:
                # NOTE: released per span, even if the same image comes again later in the
                # prompt: holding it across other images could deadlock a full cache.
                self.encoder_cache.release(feature.mm_hash, request.request_id)

    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled_token_ids: list[int | None],
        advanced: bool = False,
    ) -> list[Request]:
        """Advance each scheduled request (unless `advance` did); append its sampled token
        where one was drawn, or fill in the token `advance` reserved.

        Returns the requests that got a token (finished ones included).
        """
        updated = []
        for request, num_new, token_id in zip(
            self.scheduled_requests(output), output.num_scheduled_tokens, sampled_token_ids
        ):
            if request is None:  # aborted (or stopped) while the step ran
                continue
            if not advanced:
                self._advance(request, num_new)
            if token_id is None:
                continue  # a prefill chunk that has not reached the end of the prompt
            if request.placeholder_pending:
                request.fill_placeholder(token_id)
            else:
                request.append_output_token(token_id)
            status = self._check_stop(request, token_id)
            if status is not None:
                self.finish_request(request, status)
            updated.append(request)
        return updated

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        assert status.finished
        if request.status.finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        request.metrics.finished_time = time.monotonic()
        self._release(request)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def check_integrity(self) -> None:
        self.kv_cache.check_integrity()
        self.encoder_cache.check_integrity()
        ids = [r.request_id for r in self.running] + [r.request_id for r in self.waiting]
        assert len(ids) == len(set(ids))
        assert set(ids) == set(self.requests), (ids, list(self.requests))
        for request in self.waiting:
            assert (
                request.request_id not in self.kv_cache.req_blocks
                or not self.kv_cache.req_blocks[request.request_id]
            )
