"""Turns a scheduled step into one flat varlen forward pass and its sampled tokens.

```
step:   req A (prefill chunk, 5 tokens)   req B (decode, 1)   req C (prefill, 3)
rows:   [a0 a1 a2 a3 a4 | b0 | c0 c1 c2]           query_start_loc = [0, 5, 6, 9]
logits: rows 4, 5, 8 only (the last of each sequence)
```
Images scheduled for encoding are run through the vision tower first, in one batched call;
their embeddings are kept (keyed by mm_hash) until the encoder cache evicts them, and copied into
the rows of their placeholder tokens.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmx.config import EngineConfig
from vlmx.device import host_to_device
from vlmx.engine.request import Request
from vlmx.engine.scheduler import SchedulerOutput
from vlmx.layers.attention import (
    AttentionMetadata,
    PagedAttention,
    build_fast_plan,
    fast_path_available,
)
from vlmx.outputs import Logprob
from vlmx.worker.cuda_graph import DecodeGraphs, capture_sizes, round_up_to_size
from vlmx.worker.input_batch import StagingBuffer, StepInputs
from vlmx.worker.sampler import (
    Sampler,
    SamplerOutput,
    build_sampling_metadata,
    logprobs_to_dicts,
)

logger = logging.getLogger(__name__)

_CPU_KV_BYTES = 4 << 30  # KV cache budget on the CPU, where nothing to profile exists
_NONE: frozenset[int] = frozenset()  # stop ids of a row past its min_tokens (none masked)


def _sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """SDPA kernels for this engine's shapes.

    NOTE: cuDNN attention builds a graph for every new shape, and varlen batches bring new
    shapes every step: on CUDA it cost ~1.7 ms of host time per call (measured on an H200), so
    it is left out; FlashAttention, memory-efficient attention and the math path remain.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


@dataclass(slots=True)
class PendingStep:
    """A launched step whose sampled tokens are still on the GPU."""

    num_requests: int
    sample_rows: list[int]  # indexes of the requests that sample a token
    sample_request_ids: list[str]  # their ids, in the order of the sampled tokens
    result: SamplerOutput | None = None
    num_logprobs: list[int | None] | None = None
    host_tokens: torch.Tensor | None = None  # CUDA: the sampled ids, copied to pinned memory
    tokens_ready: torch.cuda.Event | None = None  # recorded after that copy


def _bidirectional_spans(request: Request, start: int, end: int) -> list[tuple[int, int]]:
    """Placeholder spans of `request` that overlap the step's tokens `start:end`."""
    return [
        (f.placeholder.offset, f.placeholder.end)
        for f in request.mm_features
        if f.placeholder.offset < end and f.placeholder.end > start
    ]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig, eos_token_ids: set[int]):
        self.model = model
        self.config = config
        self.device = config.device
        self.dtype = config.model_config.dtype
        self.block_size = config.cache_config.block_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.encoder_outputs: dict[str, torch.Tensor] = {}  # mm_hash -> [num_embeds, hidden]
        # CUDA: varlen FlashAttention + Triton kernels in bf16 / fp16, inputs staged in pinned
        # memory, decode steps replayed from CUDA graphs (unless enforce_eager).
        self.fast = fast_path_available(self.device, self.dtype)
        self.staging = StagingBuffer(self.device) if self.device.type == "cuda" else None
        self.graphs: DecodeGraphs | None = None
        # CUDA: the LM head runs on rows padded to one of these counts (see `_logits_input`).
        self.logits_sizes = (
            capture_sizes(config.scheduler_config.max_num_seqs)
            if self.device.type == "cuda"
            else None
        )

    def _to_device(self, array: np.ndarray | list, dtype: torch.dtype) -> torch.Tensor:
        if self.staging is None:
            return host_to_device(array, self.device, dtype)
        return self.staging.to_device(array, dtype)

    def _graphs_supported(self) -> bool:
        """Decode steps can be captured when every layer attends through the fast path."""
        return (
            self.fast
            and not self.config.enforce_eager
            and self.model.chunk_images
            and all(
                m.sliding_window is None
                for m in self.model.modules()
                if isinstance(m, PagedAttention)
            )
        )

    # -- KV cache -------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        m = self.model
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def determine_num_blocks(self) -> int:
        cache, sched = self.config.cache_config, self.config.scheduler_config
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = self.bytes_per_block()
        blocks_per_seq = math.ceil(sched.max_model_len / self.block_size)
        wanted = sched.max_num_seqs * blocks_per_seq
        if self.device.type != "cuda":
            return max(blocks_per_seq, min(wanted, _CPU_KV_BYTES // per_block))
        free, total = torch.cuda.mem_get_info(self.device)
        peak = self._profile_peak_memory()
        budget = total * cache.gpu_memory_utilization - peak
        num_blocks = int(budget // per_block)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache fits {num_blocks} blocks of {self.block_size} tokens but one "
                f"sequence of max_model_len={sched.max_model_len} needs {blocks_per_seq}; "
                "raise gpu_memory_utilization or lower max_model_len"
            )
        logger.info("KV cache: %d blocks (%.1f GiB)", num_blocks, num_blocks * per_block / 2**30)
        return min(num_blocks, wanted)

    @torch.inference_mode()
    def _profile_peak_memory(self) -> int:
        """Peak bytes (weights included) of the largest step the scheduler can build: the vision
        encoder at its per-step budget (families that provide `profile_image_features`), then
        the decoder at max_num_batched_tokens, holding the encoder's outputs."""
        sched = self.config.scheduler_config
        torch.cuda.reset_peak_memory_stats(self.device)
        embeds = []
        if hasattr(self.model, "profile_image_features"):
            features = self.model.profile_image_features(sched.encoder_budget)
            embeds = self.model.encode_images(features)
        num_tokens = min(sched.max_num_batched_tokens, sched.max_model_len)
        num_blocks = math.ceil(num_tokens / self.block_size)
        self.initialize_kv_cache(num_blocks, capture_graphs=False)
        block_table = np.arange(num_blocks, dtype=np.int32)[None]
        inputs = StepInputs(
            input_ids=[0] * num_tokens,
            positions=np.arange(num_tokens)[None].repeat(3, 0)
            if self.model.uses_mrope
            else np.arange(num_tokens),
            slots=np.arange(num_tokens),
            block_table=block_table,
            query_start_loc=[0, num_tokens],
            seq_lens=[num_tokens],
            bidirectional_spans=None if self.model.chunk_images else [[]],
        )
        self.staging.begin()
        input_ids, positions, metadata = self._device_inputs(inputs)
        hidden = self.model(self.model.embed_tokens(input_ids), positions, self.kv_caches, metadata)
        self.model.compute_logits(hidden[-sched.max_num_seqs :])
        self.staging.end()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del embeds, hidden
        self.kv_caches = []
        torch.cuda.empty_cache()
        return peak

    def initialize_kv_cache(self, num_blocks: int, capture_graphs: bool = True) -> None:
        m = self.model
        shape = (2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(m.num_layers)
        ]
        if capture_graphs and self._graphs_supported():
            sched = self.config.scheduler_config
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                sched.max_num_seqs,
                math.ceil(sched.max_model_len / self.block_size),
                self.block_size,
                self.device,
            )
            self.graphs.capture()

    # -- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, block_table: np.ndarray
    ) -> tuple[list[int | None], list[dict[int, Logprob] | None]]:
        """Run the step. Returns, per scheduled request, the sampled token (None for a prefill
        chunk short of the prompt's end) and its logprobs {token_id: Logprob} if asked."""
        return self.collect(self.launch(out, block_table))

    @torch.inference_mode()
    def launch(
        self,
        out: SchedulerOutput,
        block_table: np.ndarray,
        prev: PendingStep | None = None,
    ) -> PendingStep:
        """Queue the step's work on the GPU and return without waiting for it; `collect` then
        reads the sampled tokens. The host may do other work in between.

        `block_table`: [num requests, blocks] int32, the KV blocks of `out.requests[i]` in row
        i, -1 past its last (`KVCacheManager.block_table`).

        `prev`: the step launched before, not collected yet (async scheduling). A request whose
        input is a reserved token (`Request.placeholder_pending`) takes prev's sample for it,
        copied on the GPU.
        """
        if self.staging is not None:
            self.staging.begin()
        with _sdpa_backends(self.device):
            pending = self._launch(out, block_table, prev)
        if self.staging is not None:
            self.staging.end()
        return pending

    def collect(
        self, pending: PendingStep
    ) -> tuple[list[int | None], list[dict[int, Logprob] | None]]:
        sampled: list[int | None] = [None] * pending.num_requests
        logprobs: list[dict[int, Logprob] | None] = [None] * pending.num_requests
        if pending.result is None:
            return sampled, logprobs
        result = pending.result
        if pending.tokens_ready is not None:
            pending.tokens_ready.synchronize()  # the step's one host sync
            token_ids = pending.host_tokens.tolist()
        else:
            token_ids = result.sampled_token_ids.tolist()
        row_logprobs = (
            logprobs_to_dicts(result.logprobs, pending.num_logprobs)
            if result.logprobs is not None
            else [None] * len(pending.sample_rows)
        )
        for j, i in enumerate(pending.sample_rows):
            sampled[i] = token_ids[j]
            logprobs[i] = row_logprobs[j]
        return sampled, logprobs

    def _launch(
        self, out: SchedulerOutput, block_table: np.ndarray, prev: PendingStep | None
    ) -> PendingStep:
        for mm_hash in out.freed_mm_hashes:
            self.encoder_outputs.pop(mm_hash, None)
        self._run_encoder(out)

        requests, num_scheduled = out.requests, out.num_scheduled_tokens
        inputs = self._host_inputs(requests, num_scheduled, block_table)
        patch = self._reserved_inputs(requests, inputs.query_start_loc, prev)
        if self.graphs is not None and self._is_graph_step(requests, num_scheduled):
            hidden = self.graphs.run(
                self.staging,
                inputs.input_ids,
                inputs.positions,
                inputs.slots,
                inputs.block_table,
                inputs.seq_lens,
                patch,
            )
        else:
            input_ids, positions, metadata = self._device_inputs(inputs)
            if patch is not None:
                input_ids.index_copy_(0, *patch)
            inputs_embeds = self.model.embed_tokens(input_ids)
            self._merge_image_embeds(inputs_embeds, requests, num_scheduled)
            hidden = self.model(inputs_embeds, positions, self.kv_caches, metadata)

        sample_rows = [
            i
            for i, (r, n) in enumerate(zip(requests, num_scheduled))
            if r.num_computed_tokens + n == r.num_tokens
        ]
        pending = PendingStep(
            len(requests), sample_rows, [requests[i].request_id for i in sample_rows]
        )
        if not sample_rows:
            return pending
        hidden = self._logits_input(hidden, sample_rows, inputs.query_start_loc)
        logits = self.model.compute_logits(hidden)[: len(sample_rows)]
        rows = [requests[i] for i in sample_rows]
        sampling_metadata = build_sampling_metadata(
            params=[r.sampling_params for r in rows],
            token_ids=[r.all_token_ids for r in rows],
            prompt_lens=[r.num_prompt_tokens for r in rows],
            num_output_tokens=[r.num_output_tokens for r in rows],
            stop_token_ids=[
                self._stop_ids(r) if r.num_output_tokens < r.sampling_params.min_tokens else _NONE
                for r in rows
            ],
            generators=[r.generator for r in rows],
            vocab_size=logits.shape[-1],
            device=self.device,
            argmax_cache=self.sampler.argmax_metadata,
        )
        pending.result = self.sampler(logits, sampling_metadata)
        pending.num_logprobs = [r.sampling_params.logprobs for r in rows]
        if self.device.type == "cuda":
            # NOTE: the copy to the host is queued now, behind this step's sampling. Queued at
            # `collect`, it would wait behind the next step too (launched in between). Its
            # pinned target is the step's staging half, which `collect` reads before the step
            # after next reuses it.
            sampled = pending.result.sampled_token_ids
            pending.host_tokens = self.staging.empty(tuple(sampled.shape), sampled.dtype)
            pending.host_tokens.copy_(sampled, non_blocking=True)
            pending.tokens_ready = torch.cuda.Event()
            pending.tokens_ready.record()
        return pending

    def _logits_input(
        self, hidden: torch.Tensor, sample_rows: list[int], query_start_loc: list[int]
    ) -> torch.Tensor:
        """The hidden states the LM head reads: each sampled request's last token, in order.

        CUDA: padded (repeating the last row) to a size of `logits_sizes`, so that the head's
        GEMM meets a few shapes, all warmed up at start (`warm_up`). A shape cuBLAS meets for
        the first time costs it milliseconds of host time, with the GIL held; one per step
        (the number of sampled rows changes often) slowed the first run of a process by 15%.
        """
        n = len(sample_rows)
        size = n if self.logits_sizes is None else round_up_to_size(self.logits_sizes, n)
        if n == hidden.shape[0] == size:
            return hidden
        if n == hidden.shape[0]:  # every row samples (decode): pad with zeros
            return torch.nn.functional.pad(hidden, (0, 0, 0, size - n))
        last = [query_start_loc[i + 1] - 1 for i in sample_rows]
        last += last[-1:] * (size - n)
        return hidden[self._to_device(last, torch.long)]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """CUDA: run the LM head at every size of `logits_sizes`, so that cuBLAS chooses (and
        loads) its kernels now, not inside the first steps of a run."""
        if self.logits_sizes is None:
            return
        head = self.model.compute_logits
        hidden = torch.zeros(
            self.logits_sizes[-1],
            self.model.config.hidden_size,
            device=self.device,
            dtype=self.dtype,
        )
        for size in self.logits_sizes:
            head(hidden[:size])
        torch.cuda.synchronize(self.device)

    def _reserved_inputs(
        self, requests: list[Request], query_start_loc: list[int], prev: PendingStep | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, token ids on the device) of the inputs that are `prev`'s samples, or None."""
        rows, sources = [], []
        position: dict[str, int] | None = None
        for i, request in enumerate(requests):
            if request.placeholder_pending:
                # NOTE: only ever the last token scheduled: a step that reserves one schedules
                # no request further than it.
                assert prev is not None and prev.result is not None, request.request_id
                if position is None:
                    position = {rid: j for j, rid in enumerate(prev.sample_request_ids)}
                rows.append(query_start_loc[i + 1] - 1)
                sources.append(position[request.request_id])
        if not rows:
            return None
        sampled = prev.result.sampled_token_ids
        return self._to_device(rows, torch.long), sampled[self._to_device(sources, torch.long)]

    def _stop_ids(self, request: Request) -> set[int]:
        params = request.sampling_params
        ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            ids |= request.eos_token_ids
        return ids

    def _run_encoder(self, out: SchedulerOutput) -> None:
        features, seen = [], set()
        by_id = {r.request_id: r for r in out.requests}
        for request_id, indexes in out.encoder_inputs.items():
            for idx in indexes:
                feature = by_id[request_id].mm_features[idx]
                if feature.mm_hash not in self.encoder_outputs and feature.mm_hash not in seen:
                    seen.add(feature.mm_hash)
                    features.append(feature)
        if not features:
            return
        for feature, embeds in zip(features, self.model.encode_images(features)):
            assert embeds.shape[0] == feature.num_embeds, (embeds.shape, feature.num_embeds)
            self.encoder_outputs[feature.mm_hash] = embeds

    def _is_graph_step(self, requests: list[Request], num_scheduled: list[int]) -> bool:
        """One new token per sequence, none of them an image placeholder, within the graphs."""
        if len(requests) > self.graphs.max_batch_size:
            return False
        for request, n in zip(requests, num_scheduled):
            if n != 1:
                return False
            if request.mm_features and (
                request.num_computed_tokens < request.mm_features[-1].placeholder.end
            ):
                return False
        return True

    def _host_inputs(
        self, requests: list[Request], num_scheduled: list[int], table: np.ndarray
    ) -> StepInputs:
        if all(n == 1 for n in num_scheduled):
            return self._decode_host_inputs(requests, table)
        bs = self.block_size
        ids, pos, slots = [], [], []
        query_start_loc, seq_lens = [0], []
        mrope = self.model.uses_mrope
        for request, n, blocks in zip(requests, num_scheduled, table):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            ids.extend(request.all_token_ids[start:end])
            pos.append(self._positions(request, start, end) if mrope else np.arange(start, end))
            idx = np.arange(start, end)
            slots.append(blocks[idx // bs].astype(np.int64) * bs + idx % bs)
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
        spans = None
        if not self.model.chunk_images:  # image tokens attend to their whole span
            spans = [
                _bidirectional_spans(r, r.num_computed_tokens, r.num_computed_tokens + n)
                for r, n in zip(requests, num_scheduled)
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

    def _decode_host_inputs(self, requests: list[Request], table: np.ndarray) -> StepInputs:
        """`_host_inputs` for one token per sequence, vectorised over the batch (no array per
        sequence: a decode step of 256 sequences would spend milliseconds building small ones)."""
        bs = self.block_size
        n = len(requests)
        starts = [r.num_computed_tokens for r in requests]
        starts_np = np.asarray(starts, dtype=np.int64)
        positions = starts_np
        if self.model.uses_mrope:  # [3, T]: index + delta, or the prompt's (a 1-token chunk)
            deltas = np.fromiter((r.mrope_position_delta for r in requests), np.int64, n)
            positions = np.repeat((starts_np + deltas)[None], 3, axis=0)
            for i, (r, s) in enumerate(zip(requests, starts)):
                if s < r.num_prompt_tokens:
                    positions[:, i] = r.mrope_positions[:, s].numpy()
        spans = None
        if not self.model.chunk_images:
            spans = [_bidirectional_spans(r, s, s + 1) for r, s in zip(requests, starts)]
        return StepInputs(
            input_ids=[r.all_token_ids[s] for r, s in zip(requests, starts)],
            positions=positions,  # [T] or [3, T]
            slots=table[np.arange(n), starts_np // bs].astype(np.int64) * bs + starts_np % bs,
            block_table=table,
            query_start_loc=list(range(len(requests) + 1)),
            seq_lens=[s + 1 for s in starts],
            bidirectional_spans=spans,
        )

    def _device_inputs(
        self, inputs: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        to_device = self._to_device
        metadata = AttentionMetadata(
            query_start_loc=to_device(inputs.query_start_loc, torch.int32),
            seq_lens=to_device(inputs.seq_lens, torch.int32),
            block_tables=to_device(inputs.block_table, torch.int32),
            slot_mapping=to_device(inputs.slots, torch.int64),
            query_start_loc_cpu=inputs.query_start_loc,
            seq_lens_cpu=inputs.seq_lens,
            block_size=self.block_size,
            bidirectional_spans_cpu=inputs.bidirectional_spans,
        )
        if self.fast and inputs.bidirectional_spans is None:
            metadata.fast_plan = build_fast_plan(
                inputs.query_start_loc,
                inputs.seq_lens,
                inputs.block_table,
                self.block_size,
                metadata.block_tables,
                metadata.seq_lens,
                to_device,
            )
        input_ids = to_device(inputs.input_ids, torch.long)  # [num_tokens]
        return input_ids, to_device(inputs.positions, torch.long), metadata

    @staticmethod
    def _positions(request: Request, start: int, end: int) -> np.ndarray:
        """M-RoPE positions [3, end - start]: the processor's for prompt tokens, then
        `index + delta` on all three axes for generated ones."""
        num_prompt = request.num_prompt_tokens
        out = np.empty((3, end - start), dtype=np.int64)
        split = min(max(start, num_prompt), end)
        if start < split:
            out[:, : split - start] = request.mrope_positions[:, start:split].numpy()
        if split < end:
            out[:, split - start :] = np.arange(split, end) + request.mrope_position_delta
        return out

    def _merge_image_embeds(
        self, inputs_embeds: torch.Tensor, requests: list[Request], num_scheduled: list[int]
    ) -> None:
        """Copy encoder rows into the rows of this step's placeholder tokens."""
        rows, chunks = [], []
        row = 0
        for request, n in zip(requests, num_scheduled):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            for feature in request.mm_features:
                p = feature.placeholder
                if p.offset >= end:
                    break
                if p.end <= start:
                    continue
                lo, hi = max(start, p.offset), min(end, p.end)
                embeds = self.encoder_outputs[feature.mm_hash]
                chunks.append(embeds[lo - p.offset : hi - p.offset])
                rows.append(torch.arange(row + lo - start, row + hi - start))
            row += n
        if chunks:
            index = self._to_device(torch.cat(rows), torch.long)
            inputs_embeds.index_copy_(0, index, torch.cat(chunks).to(inputs_embeds.dtype))
