"""The engine: inputs -> requests -> scheduled steps -> outputs, one step at a time."""

from __future__ import annotations

import gc
import itertools
import logging
import operator
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig

from vlmx.config import EngineConfig
from vlmx.engine.detokenizer import IncrementalDetokenizer
from vlmx.engine.encoder_cache import EncoderCacheManager
from vlmx.engine.kv_cache import KVCacheManager
from vlmx.engine.request import Request, RequestStatus
from vlmx.engine.scheduler import Scheduler, SchedulerOutput
from vlmx.lora.request import LORA_UNSUPPORTED, LoRARequest
from vlmx.models.loader import build_model, text_config
from vlmx.models.registry import get_processor_class
from vlmx.multimodal.chat import load_images_concurrently
from vlmx.multimodal.inputs import ProcessedPrompt
from vlmx.multimodal.media import DATA_URL_CACHE
from vlmx.outputs import CompletionOutput, Logprob, RequestOutput
from vlmx.sampling_params import SamplingParams
from vlmx.worker.model_runner import ModelRunner, PendingStep
from vlmx.worker.sampler import make_generator

logger = logging.getLogger(__name__)

_PROMPT_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}


def load_tokenizer(config: EngineConfig):
    mc = config.model_config
    return AutoTokenizer.from_pretrained(
        mc.tokenizer_path,
        trust_remote_code=mc.trust_remote_code,
        use_fast=mc.tokenizer_mode != "slow",
    )


# generation_config.json field -> SamplingParams field, as vLLM reads them for its defaults
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def _read_generation_config(model_path: str) -> tuple[set[int], dict[str, Any]]:
    """The checkpoint's extra eos ids, and the sampling defaults it sets (vLLM's
    `generation_config="auto"`: used when a call passes no SamplingParams)."""
    if not os.path.isfile(os.path.join(model_path, "generation_config.json")):
        return set(), {}
    config = GenerationConfig.from_pretrained(model_path)
    eos = config.eos_token_id
    eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    explicit = config.to_diff_dict()
    defaults = {
        ours: explicit[theirs]
        for theirs, ours in _GENERATION_DEFAULTS.items()
        if theirs in explicit
    }
    return eos_ids, defaults


def _token_id_list(raw: Any) -> list[int]:
    hint = "tokenize with llm.get_tokenizer().encode(...) or pass 'prompt'"
    if isinstance(raw, (str, bytes)) or raw is None:
        raise ValueError(
            f"prompt_token_ids must be a list of int token ids, got {type(raw).__name__}; {hint}"
        )
    if isinstance(raw, torch.Tensor):
        raw = raw.tolist()
    ids = []
    for t in raw:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise ValueError(
                f"prompt_token_ids must be a list of int token ids, got {t!r} "
                f"({type(t).__name__}); {hint}"
            )
        ids.append(operator.index(t))
    return ids


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One launched step, for `LLMEngine.step_log` (a timeline of a run)."""

    launched_at: float  # time.perf_counter() when the launch began
    launch_s: float  # host time the launch took (it waits when the GPU's queue is full)
    num_tokens: int
    num_requests: int
    num_images: int  # images scheduled for the vision encoder


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        self.tokenizer = load_tokenizer(config)
        self.processor = get_processor_class(mc.architecture)(mc, self.tokenizer, config.device)
        self.model = build_model(
            mc.architecture, mc.hf_config, mc.model_path, config.device, mc.dtype, mc.load_format
        )
        self.eos_token_ids, self.default_sampling_kwargs = _read_generation_config(mc.model_path)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.runner = ModelRunner(self.model, config, self.eos_token_ids)
        num_blocks = self.runner.determine_num_blocks()
        self.runner.initialize_kv_cache(num_blocks)
        self.runner.warm_up()
        sc = config.scheduler_config
        self.scheduler = Scheduler(
            sc,
            KVCacheManager(
                num_blocks,
                config.cache_config.block_size,
                config.cache_config.enable_prefix_caching,
            ),
            EncoderCacheManager(sc.encoder_cache_size),
            chunk_images=self.model.chunk_images,
        )
        self.num_kv_blocks = num_blocks
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.prompts: dict[str, str | None] = {}
        self.parents: dict[str, list[str]] = {}  # request id -> child ids (n > 1)
        self._arrival = itertools.count()
        # (detokenizer, token id, stop_terminated) not decoded yet; see `step`
        self._deferred_tokens: list[tuple[IncrementalDetokenizer, int, bool]] = []
        self._inflight: tuple[SchedulerOutput, PendingStep] | None = None  # async scheduling
        self.step_log: list[StepRecord] | None = None  # set to a list to record each step
        self._token_texts: dict[tuple[int, bool, bool], str] = {}  # for IncrementalDetokenizer
        if config.seed is not None:  # unseeded requests draw from torch's global generator
            torch.manual_seed(config.seed)
        # NOTE: the model, tokenizer and caches built above are long-lived; moving them out of
        # the collector's generations keeps its full passes short during generation.
        gc.collect()
        gc.freeze()

    # -- inputs ---------------------------------------------------------------------------

    def process_prompt(self, prompt: Any) -> tuple[str | None, ProcessedPrompt]:
        """A vLLM-style prompt (str, or dict with prompt / prompt_token_ids / multi_modal_data)
        -> its text and processed form. Raises ValueError naming what is wrong.

        It reads the engine's state but never changes it, so several threads may run it at once
        (`LLM` does, ahead of the engine); `add_processed_request` then queues the result."""
        mc = self.config.model_config
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, Mapping):
            raise ValueError(
                f"a prompt must be a str or a dict with 'prompt' or 'prompt_token_ids', "
                f"got {type(prompt).__name__}"
            )
        unknown = set(prompt) - _PROMPT_KEYS
        if unknown:
            raise ValueError(
                f"prompt has unknown keys {sorted(unknown)}; known: {sorted(_PROMPT_KEYS)}"
            )
        text = prompt.get("prompt")
        if "prompt_token_ids" in prompt:
            token_ids = _token_id_list(prompt["prompt_token_ids"])
        elif isinstance(text, str):
            token_ids = self.tokenizer.encode(text)
        else:
            raise ValueError("a prompt dict needs 'prompt' (str) or 'prompt_token_ids' (list[int])")
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab_size = text_config(mc.hf_config).vocab_size
        for i, t in enumerate(token_ids):
            if not 0 <= t < vocab_size:
                raise ValueError(
                    f"prompt_token_ids hold id {t} (at index {i}), outside the vocabulary "
                    f"(size {vocab_size}); tokenize with llm.get_tokenizer().encode(...)"
                )

        for key in ("multi_modal_data", "mm_processor_kwargs"):
            if not isinstance(prompt.get(key) or {}, Mapping):
                raise ValueError(
                    f"{key} must be a dict (e.g. {{'image': [images]}} / {{'max_pixels': n}}), "
                    f"got {type(prompt[key]).__name__}"
                )
        mm_data = prompt.get("multi_modal_data") or {}
        unsupported = set(mm_data) - {"image"}
        if unsupported:
            raise ValueError(
                f"multi_modal_data has {sorted(unsupported)}; vlmx takes images only ('image')"
            )
        images = mm_data.get("image", [])
        if not isinstance(images, (list, tuple)):
            images = [images]
        limit = mc.max_images_per_prompt
        if limit is not None and len(images) > limit:
            raise ValueError(
                f"prompt has {len(images)} images but limit_mm_per_prompt={{'image': {limit}}}; "
                "raise limit_mm_per_prompt or send fewer images"
            )
        tensors = load_images_concurrently(list(images))
        kwargs = dict(prompt.get("mm_processor_kwargs") or {})
        processed = self.processor.process(token_ids, tensors, kwargs)
        self._check_length(processed)
        return text, processed

    def _check_length(self, processed: ProcessedPrompt) -> None:
        sc = self.config.scheduler_config
        num_tokens = len(processed.prompt_token_ids)
        num_image_tokens = sum(f.num_embeds for f in processed.mm_features)
        if num_tokens >= sc.max_model_len:
            images = ""
            advice = "raise max_model_len or shorten the prompt"
            if processed.mm_features:
                images = f" ({num_image_tokens} of them for {len(processed.mm_features)} images)"
                advice = (
                    "raise max_model_len, send fewer images, or shrink them with "
                    f"{self.processor.shrink_images_hint}"
                )
            raise ValueError(
                f"the prompt is {num_tokens} tokens{images}, over max_model_len="
                f"{sc.max_model_len} by {num_tokens - sc.max_model_len + 1} (one token must be "
                f"left to generate); {advice}"
            )
        for feature in processed.mm_features:
            if feature.num_embeds > sc.encoder_cache_size:
                raise ValueError(
                    f"an image needs {feature.num_embeds} tokens but the encoder cache holds "
                    f"{sc.encoder_cache_size}; raise max_num_batched_tokens or shrink the image "
                    f"with {self.processor.shrink_images_hint}"
                )
            if not self.scheduler.chunk_images and feature.num_embeds > sc.max_num_batched_tokens:
                raise ValueError(
                    f"an image needs {feature.num_embeds} tokens in one step but "
                    f"max_num_batched_tokens={sc.max_num_batched_tokens}; raise it"
                )

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
        self._queue(request_id, text, processed, params)

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
        self._queue(request_id, text, processed, params)

    def check_request(
        self, request_id: str, params: SamplingParams, lora_request: LoRARequest | None = None
    ) -> None:
        """Raise ValueError if the request can't be queued, whatever its prompt."""
        if lora_request is not None:
            raise ValueError(LORA_UNSUPPORTED)
        if request_id in self.requests or request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(
                f"logprobs={params.logprobs} is over max_logprobs={self.config.max_logprobs}; "
                "raise max_logprobs when building the LLM"
            )

    def _queue(
        self, request_id: str, text: str | None, processed: ProcessedPrompt, params: SamplingParams
    ) -> None:
        """Queue a checked request: one, or `params.n` children that share its prompt."""
        arrival = next(self._arrival)
        if params.n == 1:
            self._add(request_id, text, processed, params, arrival)
            return
        children = []
        for i in range(params.n):
            child = params.clone()
            child.n = 1
            if params.seed is not None:
                child.seed = params.seed + i
            children.append(f"{request_id}#{i}")
            self._add(children[-1], text, processed, child, arrival)
        self.parents[request_id] = children

    def _add(
        self,
        request_id: str,
        text: str | None,
        processed: ProcessedPrompt,
        params: SamplingParams,
        arrival: int,
    ) -> None:
        max_len = self.config.scheduler_config.max_model_len
        room = max_len - len(processed.prompt_token_ids)
        generator = (
            make_generator(params.seed, self.config.device) if params.seed is not None else None
        )
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
            generator=generator,
            arrival_index=arrival,
        )
        self.requests[request_id] = request
        self.prompts[request_id] = text
        self.detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer,
            params,
            processed.prompt_token_ids,
            self._token_texts,
            whole_text=True,  # NOTE: the text is read when the request finishes, not streamed
        )
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> None:
        for rid in self.parents.pop(request_id, [request_id]):
            request = self.requests.pop(rid, None)
            if request is not None:
                self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)
                self.detokenizers.pop(rid, None)
                self.prompts.pop(rid, None)

    def reset_prefix_cache(self) -> bool:
        if self.has_unfinished_requests():
            return False
        self.scheduler.kv_cache.pool.reset_cache()
        return True

    def reset_mm_cache(self) -> bool:
        if self.has_unfinished_requests():
            return False
        self.processor.cache.clear()
        DATA_URL_CACHE.clear()
        self.scheduler.encoder_cache.clear()
        self.runner.encoder_outputs.clear()
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
            out, pending = self._inflight
            self._inflight = None
        else:
            out = self.scheduler.schedule()
            if out.is_empty:
                if self.scheduler.has_unfinished_requests():
                    raise RuntimeError(
                        "scheduler made no progress; KV cache too small for a request"
                    )
                return []
            pending = self._launch(out, None)
        advanced = self._launch_next(out, pending)
        self._detokenize_deferred()  # the last step's tokens, while the GPU runs
        sampled, logprobs = self.runner.collect(pending)
        for request, entry in zip(out.requests, logprobs):
            if entry is not None:
                self._append_logprobs(request, entry)
        updated = self.scheduler.update_from_output(out, sampled, advanced=advanced)
        finished = []
        for request in updated:
            detokenizer = self.detokenizers[request.request_id]
            token = request.output_token_ids[-1]
            stop_terminated = request.status == RequestStatus.FINISHED_STOPPED
            if not detokenizer.stop:
                # NOTE: without stop strings the text cannot end the request, so decoding it
                # waits for the next step's launch and overlaps that step's GPU work.
                self._deferred_tokens.append((detokenizer, token, stop_terminated))
            else:
                stop = detokenizer.update([token], stop_terminated=stop_terminated)
                if stop is not None and not request.status.finished:
                    request.stop_reason = stop
                    self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
            if request.status.finished:
                finished.append(request)
        if finished:
            self._detokenize_deferred()
        return self._collect(finished)

    def _launch(self, out: SchedulerOutput, prev: PendingStep | None) -> PendingStep:
        table = self.scheduler.kv_cache.block_table([r.request_id for r in out.requests])
        start = time.perf_counter()
        pending = self.runner.launch(out, table, prev)
        if self.step_log is not None:
            self.step_log.append(
                StepRecord(
                    start,
                    time.perf_counter() - start,
                    out.total_num_scheduled_tokens,
                    len(out.requests),
                    sum(len(v) for v in out.encoder_inputs.values()),
                )
            )
        return pending

    def _launch_next(self, out: SchedulerOutput, pending: PendingStep) -> bool:
        """Async scheduling: advance past `out` (reserving each sample), schedule and launch the
        next step. Returns whether `out` was advanced. Not done when a sample feeds host-side
        logic of the next step: penalties (they read the token ids) and stop strings."""
        if not self.config.async_scheduling:
            return False
        for request in out.requests:
            params = request.sampling_params
            detokenizer = self.detokenizers.get(request.request_id)
            if (
                params.uses_repetition_penalty
                or params.uses_output_counts
                or (detokenizer is not None and detokenizer.stop)
            ):
                return False
        self.scheduler.advance(out)
        nxt = self.scheduler.schedule()
        if not nxt.is_empty:
            self._inflight = (nxt, self._launch(nxt, pending))
        return True

    def _detokenize_deferred(self) -> None:
        for detokenizer, token, stop_terminated in self._deferred_tokens:
            detokenizer.update([token], stop_terminated=stop_terminated)
        self._deferred_tokens = []

    def _append_logprobs(self, request: Request, entry: dict[int, Logprob]) -> None:
        for token_id, logprob in entry.items():
            logprob.decoded_token = self.tokenizer.decode([token_id])
        request.output_logprobs.append(entry)

    def _collect(self, finished: list[Request]) -> list[RequestOutput]:
        outputs = []
        child_to_parent = (
            {c: p for p, cs in self.parents.items() for c in cs} if self.parents else {}
        )
        done_parents = []
        for request in finished:
            parent = child_to_parent.get(request.request_id)
            if parent is None:
                outputs.append(self._request_output(request.request_id, [request]))
                self._forget(request.request_id)
            elif all(self.requests[c].status.finished for c in self.parents[parent]):
                done_parents.append(parent)
        for parent in dict.fromkeys(done_parents):
            children = [self.requests[c] for c in self.parents.pop(parent)]
            outputs.append(self._request_output(parent, children))
            for child in children:
                self._forget(child.request_id)
        return outputs

    def _forget(self, request_id: str) -> None:
        self.requests.pop(request_id)
        self.detokenizers.pop(request_id)
        self.prompts.pop(request_id)

    def _request_output(self, request_id: str, requests: list[Request]) -> RequestOutput:
        first = requests[0]
        completions = []
        for i, request in enumerate(requests):
            params = request.sampling_params
            completions.append(
                CompletionOutput(
                    index=i,
                    text=self.detokenizers[request.request_id].output_text,
                    token_ids=list(request.output_token_ids),
                    cumulative_logprob=(
                        sum(
                            lp[t].logprob
                            for lp, t in zip(request.output_logprobs, request.output_token_ids)
                        )
                        if params.logprobs is not None
                        else None
                    ),
                    logprobs=request.output_logprobs if params.logprobs is not None else None,
                    finish_reason=request.status.finish_reason,
                    stop_reason=request.stop_reason,
                )
            )
        return RequestOutput(
            request_id=request_id,
            prompt=self.prompts[first.request_id],
            prompt_token_ids=list(first.prompt_token_ids),
            prompt_logprobs=None,
            outputs=completions,
            finished=True,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            metrics=first.metrics,
        )

    @torch.inference_mode()
    def run_until_done(self) -> list[RequestOutput]:
        outputs = []
        while self.has_unfinished_requests():
            outputs.extend(self.step())
        return outputs
