"""Turns a step's records into one flat varlen forward pass and its sampled tokens.

```
step:   req A (prefill chunk, 5 tokens)   req B (decode, 1)   req C (prefill, 3)
rows:   [a0 a1 a2 a3 a4 | b0 | c0 c1 c2]           query_start_loc = [0, 5, 6, 9]
logits: rows 4, 5, 8 only (the last of each sequence)
```
The worker's own request state comes from the records (`InputBatch`); the images a step
encodes go through `EncoderRunner` first, and their embeddings into the placeholder rows.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmx.config import EngineConfig
from vlmx.device import host_to_device
from vlmx.layers.attention import (
    AttentionMetadata,
    attend_fully_within,
    build_fast_plan,
    fast_path_available,
)
from vlmx.lora.manager import LoRAManager
from vlmx.models.interface import Model
from vlmx.step import PLACEHOLDER_TOKEN_ID, RunnerOutput, SchedulerOutput
from vlmx.worker.cross_attention import CrossAttentionStore
from vlmx.worker.cuda_graph import DecodeGraphs, capture_sizes, round_up_to_size
from vlmx.worker.encoder_runner import EncoderRunner
from vlmx.worker.input_batch import InputBatch, RequestState, StepInputs
from vlmx.worker.sampler import (
    Sampler,
    SamplerOutput,
    build_sampling_metadata,
    logprobs_to_dicts,
    make_generator,
)
from vlmx.worker.staging import StagingBuffer

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
    """A launched step whose sampled tokens are still on the device."""

    num_requests: int
    sample_rows: list[int]  # indexes (in batch order) of the requests that sample a token
    # (state, index in its token_ids) of each sample, in the order of the sampled tokens
    samples: list[tuple[RequestState, int]] = field(default_factory=list)
    result: SamplerOutput | None = None
    num_logprobs: list[int | None] | None = None
    host_tokens: torch.Tensor | None = None  # CUDA: the sampled ids, copied to pinned memory
    tokens_ready: torch.cuda.Event | None = None  # recorded after that copy


class ModelRunner:
    """The forward pass, sampling and decode graphs of one model on one device."""

    def __init__(self, model: Model, config: EngineConfig, eos_token_ids: frozenset[int]):
        self.model = model
        self.config = config
        attend_fully_within(model, config.scheduler_config.max_model_len)
        self.device = config.device
        self.dtype = config.model_config.dtype
        self.block_size = config.cache_config.block_size
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
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
        # NOTE: the parts below get functions that do not hold the runner: a reference cycle
        # would outlive the engine (LLMEngine freezes the collector's generations).
        device = self.device
        self._to_device = (
            self.staging.to_device
            if self.staging is not None
            else lambda array, dtype: host_to_device(array, device, dtype)
        )
        self.input_batch = InputBatch(
            self.block_size,
            eos_token_ids,
            uses_mrope=model.uses_mrope,
            bidirectional_images=not model.chunk_images,
            make_generator=lambda seed: make_generator(seed, device),
        )
        self.encoder = EncoderRunner(model, self._to_device)
        # Cross-attention models: each request's image K/V, kept from its first step to its end
        self.cross = (
            CrossAttentionStore(model, config, self._to_device)
            if model.uses_cross_attention
            else None
        )
        # LoRA: slot weights and hooks on the adaptable layers (allocated before the KV cache
        # is sized, so its budget leaves their bytes out).
        self.lora: LoRAManager | None = None
        if config.lora_config is not None:
            self.lora = LoRAManager(model, config.lora_config, self.device, self.dtype)
            if self.lora.batch.use_triton:
                sched = config.scheduler_config
                self.lora.allocate_token_buffers(
                    max(sched.max_num_batched_tokens, capture_sizes(sched.max_num_seqs)[-1])
                )

    def _graphs_supported(self) -> bool:
        """Decode steps can be captured when every layer attends through the fast path."""
        return (
            self.fast
            and not self.config.enforce_eager
            and self.model.chunk_images
            # NOTE: cross-attention reads per-request K/V of host-chosen shapes: decode eager
            and not self.model.uses_cross_attention
            and (self.lora is None or self.lora.batch.use_triton)  # LoRA from device buffers
        )

    # -- KV cache -------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        m = self.model
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

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
            with self._lora_capture():
                self.graphs.capture()

    def _lora_capture(self) -> contextlib.AbstractContextManager:
        """While decode graphs are captured: LoRA applied from the persistent token groups
        (no token in any group), so that each replay applies the groups of its step."""
        if self.lora is None:
            return contextlib.nullcontext()
        self.lora.buffers.counts.zero_()
        return self.lora.batch.applying(self.lora.buffers)

    @torch.inference_mode()
    def profile_run(self) -> None:
        """The largest step the scheduler can build, on dummy inputs: the vision encoder at its
        per-step budget, then the decoder at max_num_batched_tokens holding the encoder's
        outputs, and the LM head at max_num_seqs rows. Allocates (and frees) a KV cache just
        large enough; the caller reads the device's peak memory."""
        sched = self.config.scheduler_config
        embeds = self.encoder.profile(sched.encoder_budget)
        cross_kv = self.cross.profile() if self.cross is not None else None
        num_tokens = min(sched.max_num_batched_tokens, sched.max_model_len)
        num_blocks = math.ceil(num_tokens / self.block_size)
        self.initialize_kv_cache(num_blocks, capture_graphs=False)
        inputs = StepInputs(
            input_ids=[0] * num_tokens,
            positions=np.arange(num_tokens)[None].repeat(3, 0)
            if self.model.uses_mrope
            else np.arange(num_tokens),
            slots=np.arange(num_tokens),
            block_table=np.arange(num_blocks, dtype=np.int32)[None],
            query_start_loc=[0, num_tokens],
            seq_lens=[num_tokens],
            bidirectional_spans=None if self.model.chunk_images else [[]],
        )
        if self.staging is not None:
            self.staging.begin()
        input_ids, positions, metadata = self._device_inputs(inputs)
        if cross_kv is not None:  # every row cross-attends, as a prompt of text after images
            metadata.cross_attention = self.cross.profile_metadata(cross_kv, num_tokens)
        groups = None
        if self.lora is not None:  # every token through slot 0 (zeros): LoRA's largest step
            groups = self.lora.token_groups(np.zeros(num_tokens, dtype=np.int64), self._stage)
        with self._lora_applying(groups):
            inputs_embeds = self.model.embed_tokens(input_ids)
            hidden = self.model(inputs_embeds, positions, self.kv_caches, metadata)
        self.model.compute_logits(hidden[-sched.max_num_seqs :])
        if self.staging is not None:
            self.staging.end()
        del embeds, hidden, cross_kv
        self.kv_caches = []

    @torch.inference_mode()
    def warm_up(self) -> None:
        """CUDA: run the LM head at every size of `logits_sizes`, so that cuBLAS chooses (and
        loads) its kernels now, not inside the first steps of a run."""
        if self.logits_sizes is None:
            return
        hidden = torch.zeros(
            self.logits_sizes[-1],
            self.model.hidden_size,
            device=self.device,
            dtype=self.dtype,
        )
        for size in self.logits_sizes:
            self.model.compute_logits(hidden[:size])
        torch.cuda.synchronize(self.device)

    # -- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        """Run the step and wait for its samples."""
        return self.collect(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: SchedulerOutput) -> PendingStep:
        """Queue the step's work on the device and return without waiting for it; `collect`
        then reads the sampled tokens. The host may do other work in between, and may launch
        the next step first (async scheduling): an input that is a sample of this step is then
        read from it on the device."""
        if self.staging is not None:
            self.staging.begin()
        with _sdpa_backends(self.device):
            pending = self._launch(step)
        if self.staging is not None:
            self.staging.end()
        return pending

    def collect(self, pending: PendingStep) -> RunnerOutput:
        sampled: list[int | None] = [None] * pending.num_requests
        logprobs: list[dict | None] = [None] * pending.num_requests
        if pending.result is None:
            return RunnerOutput(sampled, logprobs)
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
        for j, (i, (state, pos)) in enumerate(zip(pending.sample_rows, pending.samples)):
            sampled[i] = token_ids[j]
            logprobs[i] = row_logprobs[j]
            state.token_ids[pos] = token_ids[j]
            if state.pending is not None and state.pending[0] is pending:
                state.pending = None
        return RunnerOutput(sampled, logprobs)

    def _launch(self, step: SchedulerOutput) -> PendingStep:
        batch = self.input_batch
        states = batch.update(step)
        num_scheduled = step.num_scheduled_tokens
        lora_groups = self._lora_groups(states, num_scheduled)
        self.encoder.run(step, batch.requests, self._tower_lora if self._lora_tower else None)
        if self.cross is not None:
            self.cross.update(step, states)
        table = batch.block_table.gather(step.request_ids)
        inputs = batch.host_inputs(states, num_scheduled, table)
        patch = self._reserved_inputs(states, inputs.query_start_loc)
        if self.graphs is not None and self._is_graph_step(states, num_scheduled):
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
            if self.cross is not None:
                metadata.cross_attention = self.cross.metadata(states, num_scheduled)
            if patch is not None:
                input_ids.index_copy_(0, *patch)
            inputs_embeds = self.model.embed_tokens(input_ids)
            self.encoder.merge(inputs_embeds, states, num_scheduled)
            with self._lora_applying(lora_groups):
                hidden = self.model(inputs_embeds, positions, self.kv_caches, metadata)

        sample_rows = [
            i
            for i, (s, n) in enumerate(zip(states, num_scheduled))
            if s.num_computed_tokens + n == s.num_tokens
        ]
        pending = PendingStep(len(states), sample_rows)
        if not sample_rows:
            return pending
        hidden = self._logits_input(hidden, sample_rows, inputs.query_start_loc)
        logits = self.model.compute_logits(hidden)[: len(sample_rows)]
        rows = [states[i] for i in sample_rows]
        sampling_metadata = build_sampling_metadata(
            params=[s.sampling_params for s in rows],
            token_ids=[s.token_ids for s in rows],
            prompt_lens=[s.num_prompt_tokens for s in rows],
            num_output_tokens=[s.num_output_tokens for s in rows],
            stop_token_ids=[
                s.stop_token_ids if s.num_output_tokens < s.sampling_params.min_tokens else _NONE
                for s in rows
            ],
            generators=[s.generator for s in rows],
            vocab_size=logits.shape[-1],
            device=self.device,
            argmax_cache=self.sampler.argmax_metadata,
        )
        pending.result = self.sampler(logits, sampling_metadata)
        pending.num_logprobs = [s.sampling_params.logprobs for s in rows]
        for j, state in enumerate(rows):  # reserve each sample's place in its tokens
            state.token_ids.append(PLACEHOLDER_TOKEN_ID)
            pos = len(state.token_ids) - 1
            state.pending = (pending, j, pos)
            pending.samples.append((state, pos))
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

    # -- LoRA -----------------------------------------------------------------------------

    @property
    def _stage(self):
        """With the Triton kernels: how LoRA's token groups reach their persistent buffers
        (pinned staging on CUDA; plain tensors under Triton's CPU interpreter)."""
        if self.lora is None or not self.lora.batch.use_triton:
            return None
        if self.staging is None:
            return lambda array, dtype: torch.as_tensor(np.asarray(array), dtype=dtype)
        return self.staging.stage

    @property
    def _lora_tower(self) -> bool:
        return self.lora is not None and self.config.lora_config.enable_tower_connector_lora

    def _lora_groups(self, states: list[RequestState], num_scheduled: list[int]):
        """The step's tokens grouped by their request's adapter slot (None: no adapter)."""
        if self.lora is None:
            return None
        slots = self.lora.slots_for([s.lora_request for s in states])
        token_slots = np.repeat(np.asarray(slots, dtype=np.int64), num_scheduled)  # [T]
        return self.lora.token_groups(token_slots, self._stage)

    def _lora_applying(self, groups) -> contextlib.AbstractContextManager:
        if groups is None:
            return contextlib.nullcontext()
        return self.lora.batch.applying(groups)

    def _tower_lora(self, state: RequestState) -> contextlib.AbstractContextManager | None:
        """The context applying `state`'s adapter to the vision tower (None: it has none)."""
        request = state.lora_request
        if request is None or not self.lora.uses_tower(request):
            return None
        return self.lora.batch.applying(uniform_slot=self.lora.slot_of[request.lora_int_id])

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

    def _reserved_inputs(
        self, states: list[RequestState], query_start_loc: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, token ids on the device) of the step's inputs that are samples of the step
        launched before it, not read by the host yet; None when there are none."""
        rows, sources = [], []
        prev: PendingStep | None = None
        for i, state in enumerate(states):
            if state.pending is None:
                continue
            step, j, pos = state.pending
            row = query_start_loc[i + 1] - 1
            # NOTE: only ever the last token scheduled, of the one step launched before.
            assert pos == state.num_computed_tokens + row - query_start_loc[i], state.request_id
            assert prev is None or step is prev, state.request_id
            prev = step
            rows.append(row)
            sources.append(j)
        if not rows:
            return None
        sampled = prev.result.sampled_token_ids
        return self._to_device(rows, torch.long), sampled[self._to_device(sources, torch.long)]

    def _is_graph_step(self, states: list[RequestState], num_scheduled: list[int]) -> bool:
        """One new token per sequence, none of them an image placeholder, within the graphs."""
        if len(states) > self.graphs.max_batch_size:
            return False
        return all(
            n == 1 and state.num_computed_tokens >= state.mm_end
            for state, n in zip(states, num_scheduled)
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
