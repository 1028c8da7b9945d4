"""The worker's own state of every request it holds, kept from the step records, and the flat
varlen inputs of one step built from it.

```
step:   req A (prefill chunk, 5 tokens)   req B (decode, 1)   req C (prefill, 3)
rows:   [a0 a1 a2 a3 a4 | b0 | c0 c1 c2]           query_start_loc = [0, 5, 6, 9]
```
The worker appends each token it samples to its request's `token_ids` itself (the records never
carry sampled tokens back): at launch as a placeholder, filled in when the sample reaches the
host. A step launched before then (async scheduling) reads that input from the previous step's
samples on the device (`reserved_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmx.lora.request import LoRARequest
from vlmx.multimodal.inputs import MMFeature
from vlmx.sampling_params import SamplingParams
from vlmx.step import NewRequestData, SchedulerOutput


@dataclass(eq=False, slots=True)
class RequestState:
    """What the worker knows of one request: its tokens (prompt, then outputs), images and
    sampling parameters, and how far its KV is computed."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    mm_features: list[MMFeature]
    sampling_params: SamplingParams
    stop_token_ids: frozenset[int]  # eos (unless ignore_eos) and stop_token_ids
    generator: torch.Generator | None
    mrope_positions: torch.Tensor | None  # [3, num_prompt_tokens] int64
    mrope_position_delta: int
    mm_end: int  # where the last image placeholder ends (0: no images)
    num_computed_tokens: int
    # The sample not read on the host yet: (the step that draws it, its index among that
    # step's samples, its index in token_ids).
    pending: tuple[object, int, int] | None = None
    lora_request: LoRARequest | None = None  # its adapter (None: the base model)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(slots=True)
class StepInputs:
    """A scheduled step on the host, before any of it goes to the device."""

    input_ids: list[int]
    positions: np.ndarray  # [T] int64, or [3, T] for M-RoPE
    slots: np.ndarray  # [T] int64 KV cache slot of each token
    block_table: np.ndarray  # [num_seqs, max_blocks] int32, -1 = unused
    query_start_loc: list[int]
    seq_lens: list[int]
    bidirectional_spans: list[list[tuple[int, int]]] | None


class BlockTable:
    """The block ids of each request holding blocks, one row per request of one int32 array.

    A step's table is one gather of its requests' rows (no per-step rebuild from lists, which
    cost about a millisecond at 256 sequences of 2,000 tokens); -1 past each row's blocks.
    Rows and columns grow on demand; a released row is reset and reused.
    """

    def __init__(self, num_rows: int = 64, num_cols: int = 64) -> None:
        self.table = np.full((num_rows, num_cols), -1, dtype=np.int32)
        self.lengths = np.zeros(num_rows, dtype=np.int64)
        self.rows: dict[str, int] = {}
        self.free_rows = list(range(num_rows - 1, -1, -1))

    def append(self, request_id: str, block_ids: list[int]) -> None:
        row = self.rows.get(request_id)
        if row is None:
            if not self.free_rows:
                self._grow(rows=len(self.table))
            row = self.rows[request_id] = self.free_rows.pop()
        start = int(self.lengths[row])
        end = start + len(block_ids)
        if end > self.table.shape[1]:
            self._grow(cols=max(end, 2 * self.table.shape[1]) - self.table.shape[1])
        self.table[row, start:end] = block_ids
        self.lengths[row] = end

    def release(self, request_id: str) -> None:
        row = self.rows.pop(request_id, None)
        if row is not None:
            self.table[row, : self.lengths[row]] = -1
            self.lengths[row] = 0
            self.free_rows.append(row)

    def row(self, request_id: str) -> np.ndarray:
        row = self.rows.get(request_id)
        if row is None:
            return self.table[:0, 0]
        return self.table[row, : self.lengths[row]]

    def gather(self, request_ids: list[str]) -> np.ndarray:
        """[len(request_ids), max blocks among them] int32, -1 past each request's blocks."""
        rows = np.fromiter((self.rows[r] for r in request_ids), np.int64, len(request_ids))
        width = int(self.lengths[rows].max()) if len(rows) else 0
        return self.table[rows, : max(width, 1)]

    def _grow(self, rows: int = 0, cols: int = 0) -> None:
        old = len(self.table)
        self.table = np.pad(self.table, ((0, rows), (0, cols)), constant_values=-1)
        if rows:
            self.lengths = np.pad(self.lengths, (0, rows))
            self.free_rows.extend(range(old + rows - 1, old - 1, -1))


class InputBatch:
    """The worker's persistent per-request state, updated from each step's records, and the
    builder of each step's host inputs."""

    def __init__(
        self,
        block_size: int,
        eos_token_ids: frozenset[int],
        uses_mrope: bool,
        bidirectional_images: bool,
        make_generator,
    ) -> None:
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.uses_mrope = uses_mrope
        # Image tokens attend to their whole span (the model's chunk_images is False).
        self.bidirectional_images = bidirectional_images
        self.make_generator = make_generator  # seed -> torch.Generator on the device
        self.requests: dict[str, RequestState] = {}
        self.block_table = BlockTable()

    def update(self, step: SchedulerOutput) -> list[RequestState]:
        """Apply the step's records; return the states of its requests, in batch order."""
        for request_id in step.finished_request_ids:
            self.requests.pop(request_id, None)
            self.block_table.release(request_id)
        for request_id in step.preempted_request_ids:
            self.block_table.release(request_id)  # its blocks are gone; the state stays
        for new in step.new_requests:
            self.requests[new.request_id] = self._state(new)
            self.block_table.release(new.request_id)
            self.block_table.append(new.request_id, new.block_ids)
        cached = step.cached_requests
        for i, request_id in enumerate(cached.request_ids):
            self.requests[request_id].num_computed_tokens = cached.num_computed_tokens[i]
            if cached.resumed[i]:
                self.block_table.release(request_id)
            if cached.new_block_ids[i]:
                self.block_table.append(request_id, cached.new_block_ids[i])
        return [self.requests[request_id] for request_id in step.request_ids]

    def _state(self, new: NewRequestData) -> RequestState:
        params = new.sampling_params
        stop = frozenset(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop |= self.eos_token_ids
        return RequestState(
            request_id=new.request_id,
            token_ids=list(new.prompt_token_ids),
            num_prompt_tokens=len(new.prompt_token_ids),
            mm_features=new.mm_features,
            sampling_params=params,
            stop_token_ids=stop,
            generator=None if params.seed is None else self.make_generator(params.seed),
            mrope_positions=new.mrope_positions,
            mrope_position_delta=new.mrope_position_delta,
            mm_end=max((f.placeholder.end for f in new.mm_features), default=0),
            num_computed_tokens=new.num_computed_tokens,
            lora_request=new.lora_request,
        )

    # -- host inputs ----------------------------------------------------------------------

    def host_inputs(
        self, states: list[RequestState], num_scheduled: list[int], table: np.ndarray
    ) -> StepInputs:
        if all(n == 1 for n in num_scheduled):
            return self._decode_host_inputs(states, table)
        bs = self.block_size
        ids, pos, slots = [], [], []
        query_start_loc, seq_lens = [0], []
        for state, n, blocks in zip(states, num_scheduled, table):
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            ids.extend(state.token_ids[start:end])
            pos.append(
                mrope_positions(state, start, end) if self.uses_mrope else np.arange(start, end)
            )
            idx = np.arange(start, end)
            slots.append(blocks[idx // bs].astype(np.int64) * bs + idx % bs)
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
        spans = None
        if self.bidirectional_images:  # image tokens attend to their whole span
            spans = [
                _bidirectional_spans(s, s.num_computed_tokens, s.num_computed_tokens + n)
                for s, n in zip(states, num_scheduled)
            ]
        return StepInputs(
            input_ids=ids,
            positions=np.concatenate(pos, axis=-1),
            slots=np.concatenate(slots),
            block_table=table,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            bidirectional_spans=spans,
        )

    def _decode_host_inputs(self, states: list[RequestState], table: np.ndarray) -> StepInputs:
        """`host_inputs` for one token per sequence, vectorised over the batch (no array per
        sequence: a decode step of 256 sequences would spend milliseconds building small ones)."""
        bs = self.block_size
        n = len(states)
        starts = [s.num_computed_tokens for s in states]
        starts_np = np.asarray(starts, dtype=np.int64)
        positions = starts_np
        if self.uses_mrope:  # [3, T]: index + delta, or the prompt's (a 1-token chunk)
            deltas = np.fromiter((s.mrope_position_delta for s in states), np.int64, n)
            positions = np.repeat((starts_np + deltas)[None], 3, axis=0)
            for i, (s, start) in enumerate(zip(states, starts)):
                if start < s.num_prompt_tokens:
                    positions[:, i] = s.mrope_positions[:, start].numpy()
        spans = None
        if self.bidirectional_images:
            spans = [_bidirectional_spans(s, start, start + 1) for s, start in zip(states, starts)]
        return StepInputs(
            input_ids=[s.token_ids[start] for s, start in zip(states, starts)],
            positions=positions,  # [T] or [3, T]
            slots=table[np.arange(n), starts_np // bs].astype(np.int64) * bs + starts_np % bs,
            block_table=table,
            query_start_loc=list(range(n + 1)),
            seq_lens=[start + 1 for start in starts],
            bidirectional_spans=spans,
        )


def mrope_positions(state: RequestState, start: int, end: int) -> np.ndarray:
    """M-RoPE positions [3, end - start]: the processor's for prompt tokens, then
    `index + delta` on all three axes for generated ones."""
    num_prompt = state.num_prompt_tokens
    out = np.empty((3, end - start), dtype=np.int64)
    split = min(max(start, num_prompt), end)
    if start < split:
        out[:, : split - start] = state.mrope_positions[:, start:split].numpy()
    if split < end:
        out[:, split - start :] = np.arange(split, end) + state.mrope_position_delta
    return out


def _bidirectional_spans(state: RequestState, start: int, end: int) -> list[tuple[int, int]]:
    """Placeholder spans of `state` that overlap the step's tokens `start:end`."""
    return [
        (f.placeholder.offset, f.placeholder.end)
        for f in state.mm_features
        if f.placeholder.offset < end and f.placeholder.end > start
    ]
