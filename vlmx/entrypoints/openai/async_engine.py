"""`AsyncEngine`: one thread steps one `LLMEngine` for every connection (continuous batching);
each request's outputs reach its handler through an asyncio queue.

```
handler (event loop)            prompt pool (threads)         engine thread
  add(id, build, params) ------> build(); process_prompt -----> add_processed_request
  async for item in handle <---- (queue, via call_soon_threadsafe) <- step(): StreamDelta...,
                                                                        RequestOutput at the end
  handle.abort() ------------------------------------------------> abort_request (frees KV)
```
The engine is touched only by the engine thread; prompts are built and processed (template,
tokenizer, images) on the pool, which `LLMEngine.process_prompt` allows.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vlmx.engine.detokenizer import IncrementalDetokenizer
from vlmx.engine.engine import LLMEngine
from vlmx.engine.request import Request
from vlmx.outputs import Logprob, RequestOutput
from vlmx.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PROMPT_THREADS = 2  # as `vlmx.llm.PROCESS_THREADS`: more compete with the engine for the GIL
IDLE_WAIT_S = 0.5  # the engine thread's longest sleep with nothing to do (it wakes on adds)


class EngineObserver(Protocol):
    """What the engine thread reports (the server's Prometheus metrics)."""

    def on_added(self, num_prompt_tokens: int, num_images: int) -> None: ...

    def on_step(self, num_running: int, num_waiting: int, kv_usage: float) -> None: ...

    def on_finished(self, output: RequestOutput) -> None: ...


@dataclass(slots=True)
class StreamDelta:
    """New output of one completion of a streamed request. The last one of each completion has
    its `finish_reason`."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class EngineError(RuntimeError):
    """The engine failed on a step; its requests were aborted."""


@dataclass(eq=False)
class _Tracked:
    """The engine thread's view of one request: where its outputs go, what was streamed."""

    sink: Callable[[Any], None]
    stream: bool
    child_ids: list[str] = field(default_factory=list)
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)
    num_sent: list[int] = field(default_factory=list)  # tokens streamed, per completion
    sent_text: list[str] = field(default_factory=list)


class RequestHandle:
    """One request's outputs, in order: `StreamDelta`s (streamed requests), then its
    `RequestOutput`. Iterating raises `EngineError` if the engine failed."""

    def __init__(self, engine: AsyncEngine, request_id: str, items: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self._items = items
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[StreamDelta | RequestOutput]:
        while not self.finished:
            item = await self._items.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if isinstance(item, RequestOutput):
                self.finished = True
            yield item

    def abort(self) -> None:
        """Stop the request if it is running and free its KV blocks; no-op once finished."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, observer: EngineObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._pool = ThreadPoolExecutor(PROMPT_THREADS, thread_name_prefix="vlmx-serve-prompt")
        self._thread = threading.Thread(target=self._run, name="vlmx-engine", daemon=True)
        self._thread.start()

    async def add(
        self,
        request_id: str,
        build_prompt: Callable[[], Any],
        params: SamplingParams,
        stream: bool = False,
    ) -> RequestHandle:
        """Build and process the prompt (on the pool), queue the request. Raises ValueError,
        with nothing queued, for a bad prompt or bad parameters."""
        loop = asyncio.get_running_loop()
        text, processed = await loop.run_in_executor(
            self._pool, lambda: self.engine.process_prompt(build_prompt())
        )
        items: asyncio.Queue = asyncio.Queue()

        def sink(item: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        accepted: asyncio.Future = loop.create_future()
        tracked = _Tracked(sink, stream)
        self._send(("add", request_id, text, processed, params, tracked, loop, accepted))
        try:
            await accepted  # NOTE: raises the engine's ValueError (e.g. logprobs over the limit)
        except asyncio.CancelledError:  # the client left while the request was being queued
            self.abort(request_id)  # NOTE: commands run in order, so this follows the add
            raise
        return RequestHandle(self, request_id, items)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- the engine thread ------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._take_commands()
            if not engine.has_unfinished_requests():
                self._report_step()
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:
                logger.exception("engine step failed; aborting its requests")
                self._fail_all(EngineError(f"the engine failed: {type(e).__name__}: {e}"))
                continue
            for output in outputs:
                self._finish(output)
            self._stream_deltas()
            self._report_step()

    def _take_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(*command[1:])
            elif command[0] == "abort" and self._tracked.pop(command[1], None) is not None:
                self.engine.abort_request(command[1])

    def _add(self, request_id, text, processed, params, tracked, loop, accepted) -> None:
        def resolve(error: BaseException | None) -> None:
            if accepted.done():
                return
            if error is None:
                accepted.set_result(None)
            else:
                accepted.set_exception(error)

        try:
            self.engine.add_processed_request(request_id, text, processed, params)
        except Exception as e:
            loop.call_soon_threadsafe(resolve, e)
            return
        tracked.child_ids = self.engine.output_processor.parents.get(request_id, [request_id])
        if tracked.stream:
            for child_id in tracked.child_ids:
                child = self.engine.requests[child_id]
                tracked.detokenizers.append(
                    IncrementalDetokenizer(
                        self.engine.tokenizer, child.sampling_params, child.prompt_token_ids
                    )
                )
                tracked.num_sent.append(0)
                tracked.sent_text.append("")
        self._tracked[request_id] = tracked
        if self.observer is not None:
            num_images = len(processed.mm_features)
            self.observer.on_added(len(processed.prompt_token_ids), num_images)
        loop.call_soon_threadsafe(resolve, None)

    def _stream_deltas(self) -> None:
        requests = self.engine.requests
        for tracked in self._tracked.values():
            if not tracked.stream:
                continue
            for index, child_id in enumerate(tracked.child_ids):
                request = requests.get(child_id)
                if request is None or request.status.finished:
                    continue  # its last text comes with the RequestOutput
                delta = self._delta(tracked, index, request)
                if delta is not None:
                    tracked.sink(delta)

    def _delta(self, tracked: _Tracked, index: int, request: Request) -> StreamDelta | None:
        num_ready = request.num_output_tokens - int(request.placeholder_pending)
        start = tracked.num_sent[index]
        if num_ready <= start:
            return None
        new_ids = request.output_token_ids[start:num_ready]
        tracked.num_sent[index] = num_ready
        detokenizer = tracked.detokenizers[index]
        detokenizer.update(new_ids)
        text = detokenizer.get_next_delta()
        tracked.sent_text[index] += text
        logprobs = None
        if request.sampling_params.logprobs is not None:
            logprobs = request.output_logprobs[start:num_ready]
        return StreamDelta(index, text, new_ids, logprobs)

    def _finish(self, output: RequestOutput) -> None:
        tracked = self._tracked.pop(output.request_id, None)
        if tracked is None:
            return  # aborted
        if tracked.stream:
            for index, completion in enumerate(output.outputs):
                start = tracked.num_sent[index]
                sent = tracked.sent_text[index]
                # NOTE: the engine's text is the answer; what was streamed is a prefix of it
                # (the stream holds back a possible stop string's start).
                assert completion.text.startswith(sent), (sent, completion.text)
                logprobs = None if completion.logprobs is None else completion.logprobs[start:]
                tracked.sink(
                    StreamDelta(
                        index,
                        completion.text[len(sent) :],
                        completion.token_ids[start:],
                        logprobs,
                        completion.finish_reason,
                        completion.stop_reason,
                    )
                )
        tracked.sink(output)
        if self.observer is not None:
            self.observer.on_finished(output)

    def _fail_all(self, error: EngineError) -> None:
        for request_id, tracked in list(self._tracked.items()):
            tracked.sink(error)
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("could not abort %s", request_id)
        self._tracked.clear()

    def _report_step(self) -> None:
        if self.observer is None:
            return
        scheduler = self.engine.scheduler
        kv = scheduler.kv_cache.pool
        usage = 1.0 - kv.num_free_blocks / max(kv.num_blocks, 1)
        self.observer.on_step(len(scheduler.running), len(scheduler.waiting), usage)
