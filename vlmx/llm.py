"""`LLM`: vLLM's offline API (generate, chat) over the vlmx engine."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tqdm.auto import tqdm

from vlmx.engine.engine import LLMEngine
from vlmx.engine.engine_args import EngineArgs, engine_args_from_kwargs
from vlmx.lora.request import LoRARequest
from vlmx.multimodal.chat import (
    parse_chat_messages,
    render_chat,
    resolve_chat_template,
    split_conversations,
)
from vlmx.multimodal.inputs import ProcessedPrompt
from vlmx.outputs import RequestOutput
from vlmx.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Threads that process prompts ahead of the engine. Much of their work releases the GIL (image
# decoding, on the pool of the engine's `MediaLoader`; torch ops; tokenizers), so a few keep
# up with the engine; more compete for the GIL with the thread that steps it. Measured on an H200
# (Qwen2.5-VL-3B, 256 prompts): 2 threads beat 4 by 8% on random-mm and w2-decode, and 1.
PROCESS_THREADS = 2
# Prompts processed ahead of the ones the engine has taken. Enough for the engine's next steps
# (a 16,384-token step takes 8 to 10 prompts of one or two images); more only front-loads the
# threads' work onto the first seconds, when the engine thread needs the GIL most. Measured on
# an H200 (Qwen2.5-VL-3B, 256 prompts, later runs in one process): 24 ahead against 256 gave
# w3-shared 3.3 s against 4.0 s and random-mm 7.45 s against 7.55 s.
PROCESS_AHEAD = 24


class InvalidPromptsError(ValueError):
    """Some prompts of a batch were invalid. The valid ones ran; their outputs are in `outputs`
    (None at the invalid indexes), and `errors` maps each invalid index to its message."""

    def __init__(self, errors: dict[int, str], outputs: list[RequestOutput | None]) -> None:
        self.errors = errors
        self.outputs = outputs
        lines = [f"  prompt {i}: {msg}" for i, msg in sorted(errors.items())]
        super().__init__(
            f"{len(errors)} of {len(outputs)} prompts were invalid and did not run (the other "
            f"{len(outputs) - len(errors)} ran; see .outputs):\n" + "\n".join(lines)
        )


class LLM:
    """An engine for one model. Arguments are `EngineArgs`' fields, as for `vllm.LLM`.

    Safe to share between threads: calls of `generate` and `chat` on one `LLM` run one at a
    time, in the order they take its lock; a call from a second thread waits until the running
    one returns, and each gets exactly its own outputs. `reset_prefix_cache` / `reset_mm_cache`
    return False while another thread's call runs. (The `llm_engine` itself is not thread-safe.)
    """

    def __init__(self, model: str = "demo", **kwargs: Any) -> None:
        args = engine_args_from_kwargs(model, **kwargs)
        self.engine_args = args
        self.llm_engine = LLMEngine(args.create_engine_config())
        self._ids = itertools.count()
        self._run_lock = threading.Lock()  # one generate / chat at a time; see the class
        # NOTE: threads start on first use and end once the LLM is garbage collected.
        self._process_pool = ThreadPoolExecutor(PROCESS_THREADS, thread_name_prefix="vlmx-prompt")

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLM:
        from dataclasses import asdict

        return cls(**asdict(engine_args))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block, so that the next prompts share nothing with earlier
        ones (as vLLM's `LLM.reset_prefix_cache`). False, and nothing forgotten, while requests
        are unfinished (also another thread's call)."""
        with self._idle() as idle:
            return idle and self.llm_engine.reset_prefix_cache()

    def reset_mm_cache(self) -> bool:
        """Forget the decoded data URLs, the processed images and the vision encoder's cached
        outputs (as vLLM's `LLM.reset_mm_cache`). False, and nothing forgotten, while requests
        are unfinished (also another thread's call)."""
        with self._idle() as idle:
            return idle and self.llm_engine.reset_mm_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults (temperature,
        top_p, top_k, min_p, repetition_penalty, max_new_tokens), as vLLM uses when none are
        given; plain SamplingParams() where the checkpoint sets none."""
        return SamplingParams(**self.llm_engine.default_sampling_kwargs)

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | list[LoRARequest] | None = None,
    ) -> list[RequestOutput]:
        """Run a batch of prompts (str, or dict with prompt / prompt_token_ids and
        multi_modal_data) with continuous batching; outputs come back in input order.

        An invalid prompt does not stop the others: they all run, then `InvalidPromptsError`
        (a ValueError) names every invalid prompt and carries the outputs of the valid ones.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        loras = self._lora_list(lora_request, len(prompts))
        with self._run_lock:
            return self._run(prompts, params, use_tqdm, loras)

    def chat(
        self,
        messages: dict | list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """OpenAI-style conversations rendered with the model's chat template (or
        `chat_template`) and run as one batch. `messages`: one message dict, one conversation
        (a list of message dicts) or a list of conversations; one output per conversation."""
        if chat_template_content_format not in ("auto", "openai"):
            raise ValueError(
                f"chat_template_content_format={chat_template_content_format!r} is not supported; "
                "vlmx passes content to the template as a list of typed parts: use 'auto' or "
                "'openai'"
            )
        conversations = split_conversations(messages)
        render_kwargs = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "chat_template_kwargs": chat_template_kwargs,
        }
        with self._run_lock:  # NOTE: rendering and tokenizing too, not only the run
            prompts = self._chat_prompts(
                conversations, chat_template, render_kwargs, mm_processor_kwargs
            )
            params = self._params_list(sampling_params, len(prompts))
            loras = self._lora_list(lora_request, len(prompts))
            return self._run(prompts, params, use_tqdm, loras)

    def _chat_prompts(
        self,
        conversations: list[list],
        chat_template: str | None,
        render_kwargs: dict[str, Any],
        mm_processor_kwargs: dict[str, Any] | None,
    ) -> list[Any]:
        """One prompt dict per conversation (or a `_BadPrompt` where it fails to render)."""
        engine = self.llm_engine
        template = resolve_chat_template(
            chat_template, engine.config.model_config.model_path, engine.tokenizer
        )
        prompts: list[Any] = []
        for conversation in conversations:
            try:
                normalized, images = parse_chat_messages(conversation)
                text = render_chat(engine.tokenizer, normalized, template, **render_kwargs)
            except ValueError as e:
                prompts.append(_BadPrompt(str(e)))
                continue
            prompt: dict[str, Any] = {
                "prompt_token_ids": engine.input_processor.encode(text, add_special_tokens=False),
                "prompt": text,
            }
            if images:
                prompt["multi_modal_data"] = {"image": images}
            if mm_processor_kwargs:
                prompt["mm_processor_kwargs"] = mm_processor_kwargs
            prompts.append(prompt)
        return prompts

    def _params_list(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(
                f"got {len(params)} sampling_params for {n} prompts; pass one, or one per prompt"
            )
        return params

    def _lora_list(
        self, lora_request: LoRARequest | Sequence[LoRARequest | None] | None, n: int
    ) -> list[LoRARequest | None]:
        """One adapter (or None: the base model) per prompt, from one for all or a list."""
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * n
        loras = list(lora_request)
        if len(loras) != n:
            raise ValueError(
                f"got {len(loras)} lora_requests for {n} prompts; pass one, or one per prompt"
            )
        return loras

    def _run(
        self,
        prompts: list[Any],
        params: list[SamplingParams],
        use_tqdm: bool,
        loras: list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Feed `prompts` to the engine in order as it has room, step it until all are done.
        The caller holds `_run_lock`.

        Prompts are processed (tokenized, images loaded and preprocessed) on `_process_pool`
        while the engine steps on this thread, at most `PROCESS_AHEAD` of them ahead of the engine;
        each is queued once it and all before it are processed, so requests keep prompt order.
        """
        engine = self.llm_engine
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        errors: dict[int, str] = {}
        index_of: dict[str, int] = {}
        # Requests are fed as the engine has room, so images are decoded and preprocessed
        # shortly before they are needed rather than all up front.
        max_num_seqs = engine.config.scheduler_config.max_num_seqs
        max_waiting = 2 * max_num_seqs
        ahead = _ProcessAhead(
            self._process_pool, self._process_prompt, prompts, min(max_num_seqs, PROCESS_AHEAD)
        )
        bar = tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm)
        try:
            while ahead.num_left or engine.has_unfinished_requests():
                while (
                    ahead.num_left
                    and engine.scheduler.num_unfinished < max_waiting
                    and engine.has_input_room()
                ):
                    if not ahead.next_is_done() and engine.should_step():
                        break  # NOTE: step the engine rather than wait for the next prompt
                    i, processed = ahead.take()
                    request_id = str(next(self._ids))
                    try:
                        # NOTE: one message per prompt, chosen as before: the conversation's,
                        # the request's (as in add_request), then the prompt's.
                        if isinstance(prompts[i], _BadPrompt):
                            raise ValueError(prompts[i].message)
                        lora = loras[i] if loras else None
                        engine.check_request(request_id, params[i], lora)
                        engine.add_processed_request(
                            request_id, *processed.result(), params[i], lora
                        )
                    except ValueError as e:
                        errors[i] = str(e)
                        bar.update(1)
                        continue
                    except Exception as e:  # a gap in validation must not cost the batch
                        logger.exception("prompt %d failed to process", i)
                        errors[i] = f"{type(e).__name__}: {e}"
                        bar.update(1)
                        continue
                    index_of[request_id] = i
                for output in engine.step():
                    outputs[index_of.pop(output.request_id)] = output
                    bar.update(1)
        except BaseException:
            ahead.cancel()
            for request_id in index_of:
                engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        if errors:
            raise InvalidPromptsError(errors, outputs)
        return outputs  # type: ignore[return-value]

    @contextlib.contextmanager
    def _idle(self) -> Iterator[bool]:
        """Holds the run lock if no call runs; yields whether it got it (never waits)."""
        acquired = self._run_lock.acquire(blocking=False)
        try:
            yield acquired
        finally:
            if acquired:
                self._run_lock.release()

    def _process_prompt(self, prompt: Any) -> tuple[str | None, ProcessedPrompt]:
        """`LLMEngine.process_prompt`, run on `_process_pool`; a `_BadPrompt` raises its error."""
        if isinstance(prompt, _BadPrompt):
            raise ValueError(prompt.message)
        return self.llm_engine.process_prompt(prompt)


class _ProcessAhead:
    """Runs `process` over `prompts` on `pool`, in order, at most `max_ahead` prompts ahead of
    the ones taken: the futures of prompts submitted but not taken never number more.

    ```
    prompts:  0 1 2 3 | 4 5 6 | 7 8 9 ...      max_ahead = 3
              taken     ahead   not submitted
    ```
    """

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        process: Callable[[Any], tuple[str | None, ProcessedPrompt]],
        prompts: list[Any],
        max_ahead: int,
    ) -> None:
        assert max_ahead >= 1, max_ahead
        self._pool = pool
        self._process = process
        self._prompts = prompts
        self._max_ahead = max_ahead
        self._ahead: deque[Future[tuple[str | None, ProcessedPrompt]]] = deque()
        self._num_taken = 0
        self._submit()

    @property
    def num_left(self) -> int:
        """Prompts not taken yet."""
        return len(self._prompts) - self._num_taken

    def next_is_done(self) -> bool:
        """Whether the next prompt is processed (or failed), so `take` won't wait for it."""
        return self._ahead[0].done()

    def take(self) -> tuple[int, Future[tuple[str | None, ProcessedPrompt]]]:
        """The next prompt's index and its future, which `result()` waits for."""
        idx, future = self._num_taken, self._ahead.popleft()
        self._num_taken += 1
        self._submit()
        return idx, future

    def cancel(self) -> None:
        """Cancel the prompts not started; those being processed finish and are dropped."""
        for future in self._ahead:
            future.cancel()

    def _submit(self) -> None:
        num_submitted = self._num_taken + len(self._ahead)
        while num_submitted < len(self._prompts) and len(self._ahead) < self._max_ahead:
            self._ahead.append(self._pool.submit(self._process, self._prompts[num_submitted]))
            num_submitted += 1


class _BadPrompt:
    """A chat conversation that failed to render; reported like any invalid prompt."""

    def __init__(self, message: str) -> None:
        self.message = message
