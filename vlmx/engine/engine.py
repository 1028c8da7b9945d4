"""The engine: inputs -> requests -> scheduled steps -> outputs, one step at a time.

`LLMEngine` owns the scheduler (with the KV and encoder cache accounts) and talks to the
workers only through an `Executor`, with step records (`vlmx.step`). Prompt processing is in
`input_processor.py`, text and output assembly in `output_processor.py`.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from vlmx.config import EngineConfig
from vlmx.engine.encoder_cache import EncoderCacheManager
from vlmx.engine.input_processor import InputProcessor, load_tokenizer, read_generation_config
from vlmx.engine.kv_cache import KVCacheManager
from vlmx.engine.output_processor import OutputProcessor
from vlmx.engine.request import Request, RequestStatus
from vlmx.engine.scheduler import Scheduler
from vlmx.lora.checker import LoRAChecker
from vlmx.lora.request import LORA_DISABLED, LoRARequest
from vlmx.models.registry import get_model_class, get_processor_class
from vlmx.multimodal.inputs import ProcessedPrompt
from vlmx.multimodal.loader import MediaLoader
from vlmx.outputs import RequestOutput
from vlmx.sampling_params import SamplingParams
from vlmx.step import SchedulerOutput
from vlmx.worker.executor import Executor, InProcessExecutor

logger = logging.getLogger(__name__)


def input_bytes(processed: ProcessedPrompt) -> int:
    """Bytes of the prompt's encoder inputs (on the engine's device, where the processor puts
    them)."""
    return sum(
        t.nbytes
        for feature in processed.mm_features
        for t in feature.data.values()
        if isinstance(t, torch.Tensor)
    )


def with_adapter_hashes(processed: ProcessedPrompt, lora_int_id: int) -> ProcessedPrompt:
    """`processed` with each image's hash keyed by the adapter too: an adapter on the vision
    tower or projector changes the image's encoder output (and so its KV)."""
    features = [
        dataclasses.replace(f, mm_hash=f"{f.mm_hash}+lora{lora_int_id}")
        for f in processed.mm_features
    ]
    return dataclasses.replace(processed, mm_features=features)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One launched step, for `LLMEngine.step_log` (a timeline of a run)."""

    launched_at: float  # time.perf_counter() when the launch began
    launch_s: float  # host time the launch took (it waits when the GPU's queue is full)
    num_tokens: int
    num_requests: int
    num_images: int  # images scheduled for the vision encoder


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        mc = config.model_config
        self.tokenizer = load_tokenizer(config)
        self.processor = get_processor_class(mc.architecture)(
            mc, self.tokenizer, config.device, config.cache_config.processor_cache_bytes
        )
        eos_token_ids, self.default_sampling_kwargs = read_generation_config(mc.model_path)
        if self.tokenizer.eos_token_id is not None:
            eos_token_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos_token_ids)
        chunk_images = get_model_class(mc.architecture).chunk_images
        self.input_processor = InputProcessor(
            config, self.tokenizer, self.processor, MediaLoader(mc.media_limits), chunk_images
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.executor = executor or InProcessExecutor(config, self.eos_token_ids)
        sc = config.scheduler_config
        self.num_kv_blocks = self.executor.num_blocks
        self.scheduler = Scheduler(
            sc,
            KVCacheManager(
                self.num_kv_blocks,
                config.cache_config.block_size,
                config.cache_config.enable_prefix_caching,
            ),
            EncoderCacheManager(sc.encoder_cache_size),
            chunk_images=chunk_images,
            max_loras=config.lora_config.max_loras if config.lora_config else None,
        )
        self.lora_checker = (
            LoRAChecker(mc.architecture, mc.hf_config, config.lora_config)
            if config.lora_config
            else None
        )
        self.requests: dict[str, Request] = {}
        # Device bytes of encoder inputs each queued prompt holds (by its id, a parent's for
        # n > 1) until its output is returned; `has_input_room` bounds their sum.
        self.input_bytes: dict[str, int] = {}
        self.num_input_bytes = 0
        self._arrival = itertools.count()
        self._inflight: tuple[SchedulerOutput, object] | None = None  # async scheduling
        self.step_log: list[StepRecord] | None = None  # set to a list to record each step
        # NOTE: the model, tokenizer and caches built above are long-lived; moving them out of
        # the collector's generations keeps its full passes short during generation.
        gc.collect()
        gc.freeze()

    @property
    def media(self) -> MediaLoader:
        """This engine's image loading: its limits, thread pool and data URL cache."""
        return self.input_processor.media

    # -- inputs ---------------------------------------------------------------------------

    def process_prompt(self, prompt: Any) -> tuple[str | None, ProcessedPrompt]:
        """A vLLM-style prompt (str, or dict with prompt / prompt_token_ids / multi_modal_data)
        -> its text and processed form. Raises ValueError naming what is wrong.

        It reads the engine's state but never changes it, so several threads may run it at once
        (`LLM` does, ahead of the engine); `add_processed_request` then queues the result."""
        return self.input_processor.process(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validate, process and queue one request. A bad request raises ValueError and leaves
        the engine and the other requests as they were."""
        self.check_request(request_id, params, lora_request)
        text, processed = self.process_prompt(prompt)
        self._queue(request_id, text, processed, params, lora_request)

    def add_processed_request(
        self,
        request_id: str,
        text: str | None,
        processed: ProcessedPrompt,
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a prompt that `process_prompt` returned (`text`, `processed`), maybe on another
        thread; the request is checked as `add_request` checks it. Requests are scheduled in the
        order they are queued."""
        self.check_request(request_id, params, lora_request)
        self._queue(request_id, text, processed, params, lora_request)

    def check_request(
        self, request_id: str, params: SamplingParams, lora_request: LoRARequest | None = None
    ) -> None:
        """Raise ValueError if the request can't be queued, whatever its prompt."""
        if lora_request is not None:
            self.check_lora(lora_request)
        if request_id in self.requests or request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(
                f"logprobs={params.logprobs} is over max_logprobs={self.config.max_logprobs}; "
                "raise max_logprobs when building the LLM"
            )

    def check_lora(self, lora_request: LoRARequest) -> None:
        """Raise ValueError if the adapter cannot be applied (or LoRA is off)."""
        if self.lora_checker is None:
            raise ValueError(LORA_DISABLED)
        self.lora_checker.check(lora_request)

    def _queue(
        self,
        request_id: str,
        text: str | None,
        processed: ProcessedPrompt,
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a checked request: one, or `params.n` children that share its prompt."""
        arrival = next(self._arrival)
        if lora_request is not None and self.lora_checker.check(lora_request).uses_tower:
            processed = with_adapter_hashes(processed, lora_request.lora_int_id)
        num_bytes = input_bytes(processed)
        self.input_bytes[request_id] = num_bytes
        self.num_input_bytes += num_bytes
        if params.n == 1:
            self._add(request_id, text, processed, params, arrival, lora_request)
            return
        children = []
        for i in range(params.n):
            child = params.clone()
            child.n = 1
            if params.seed is not None:
                child.seed = params.seed + i
            children.append(f"{request_id}#{i}")
            self._add(children[-1], text, processed, child, arrival, lora_request)
        self.output_processor.add_parent(request_id, children)

    def _add(
        self,
        request_id: str,
        text: str | None,
        processed: ProcessedPrompt,
        params: SamplingParams,
        arrival: int,
        lora_request: LoRARequest | None = None,
    ) -> None:
        room = self.config.scheduler_config.max_model_len - len(processed.prompt_token_ids)
        request = Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=processed.prompt_token_ids,
            mm_features=processed.mm_features,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            max_tokens=room if params.max_tokens is None else min(params.max_tokens, room),
            mrope_positions=processed.mrope_positions,
            mrope_position_delta=processed.mrope_position_delta,
            arrival_index=arrival,
            lora_request=lora_request,
            lora_int_id=lora_request.lora_int_id if lora_request else 0,
        )
        self.requests[request_id] = request
        self.output_processor.add(request_id, text, processed.prompt_token_ids, params)
        self.scheduler.add_request(request)

    def has_input_room(self) -> bool:
        """Whether the encoder inputs of the queued prompts leave room for more, within the
        memory the KV cache was sized around (`mm_input_gb`). True when nothing is queued, so
        that a prompt larger than the whole budget still runs, alone."""
        budget = self.executor.mm_input_bytes
        return budget is None or not self.requests or self.num_input_bytes < budget

    def _release_inputs(self, request_id: str) -> None:
        self.num_input_bytes -= self.input_bytes.pop(request_id, 0)

    def abort_request(self, request_id: str) -> None:
        self._release_inputs(request_id)
        for rid in self.output_processor.forget_parent(request_id):
            request = self.requests.pop(rid, None)
            if request is not None:
                self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)
                self.output_processor.forget(rid)

    def reset_prefix_cache(self) -> bool:
        if self.has_unfinished_requests():
            return False
        self.scheduler.kv_cache.pool.reset_cache()
        return True

    def reset_mm_cache(self) -> bool:
        if self.has_unfinished_requests():
            return False
        self.processor.cache.clear()
        self.media.clear()
        self.scheduler.encoder_cache.clear()
        self.executor.reset_encoder_cache()
        return True

    # -- stepping -------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._inflight is not None

    def should_step(self) -> bool:
        """Whether stepping now beats waiting for more requests to be added: a step is in
        flight or some request is running, or the waiting ones fill a step's token budget.
        (A first step of one short prompt would leave the GPU mostly idle for its length.)"""
        return self._inflight is not None or self.scheduler.would_fill_step()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return the outputs of requests that finished in it.

        With async scheduling, the next step is scheduled and launched before this one's
        samples are read (its inputs take them on the GPU), and runs while the host does this
        step's bookkeeping; the next call collects it.
        """
        if self._inflight is not None:
            out, handle = self._inflight
            self._inflight = None
        else:
            out = self.scheduler.schedule()
            if out.is_empty:
                if self.scheduler.has_unfinished_requests():
                    raise RuntimeError(
                        "scheduler made no progress; KV cache too small for a request"
                    )
                return []
            handle = self._launch(out)
        advanced = self._launch_next(out)
        self.output_processor.flush()  # the last step's tokens, while the GPU runs
        result = self.executor.collect(handle)
        for request, entry in zip(self.scheduler.scheduled_requests(out), result.logprobs):
            if entry is not None and request is not None:
                request.output_logprobs.append(self.output_processor.decode_logprobs(entry))
        updated = self.scheduler.update_from_output(
            out, result.sampled_token_ids, advanced=advanced
        )
        finished = []
        for request in updated:
            stop = self.output_processor.update(request)
            if stop is not None and not request.status.finished:
                request.stop_reason = stop
                self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
            if request.status.finished:
                finished.append(request)
        if not finished:
            return []
        outputs, done = self.output_processor.collect(finished, self.requests)
        for request_id in done:
            del self.requests[request_id]
        for output in outputs:
            self._release_inputs(output.request_id)
        return outputs

    def _launch(self, out: SchedulerOutput) -> object:
        start = time.perf_counter()
        handle = self.executor.launch(out)
        if self.step_log is not None:
            self.step_log.append(
                StepRecord(
                    start,
                    time.perf_counter() - start,
                    out.total_num_scheduled_tokens,
                    len(out.request_ids),
                    out.num_images,
                )
            )
        return handle

    def _launch_next(self, out: SchedulerOutput) -> bool:
        """Async scheduling: advance past `out` (reserving each sample), schedule and launch the
        next step. Returns whether `out` was advanced. Not done when a sample feeds host-side
        logic of the next step: penalties (they read the token ids) and stop strings."""
        if not self.config.async_scheduling:
            return False
        for request in self.scheduler.scheduled_requests(out):
            if request is None:
                continue
            params = request.sampling_params
            if (
                params.uses_repetition_penalty
                or params.uses_output_counts
                or self.output_processor.has_stop_strings(request.request_id)
            ):
                return False
        self.scheduler.advance(out)
        nxt = self.scheduler.schedule()
        if not nxt.is_empty:
            self._inflight = (nxt, self._launch(nxt))
        return True

    @torch.inference_mode()
    def run_until_done(self) -> list[RequestOutput]:
        outputs = []
        while self.has_unfinished_requests():
            outputs.extend(self.step())
        return outputs

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """vLLM's `LLMEngine.add_lora`: check the adapter now (ValueError if it cannot be
        applied); the worker reads its weights when a request first uses it."""
        self.check_lora(lora_request)
        return True
