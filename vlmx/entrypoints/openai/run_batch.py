"""`vlmx run-batch`: an OpenAI batch file through one engine, streamed, resumable.

```
IN.jsonl   {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
OUT.jsonl  {"id": "vlmx-...", "custom_id": "a",
            "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}},
            "error": null}
```
A request the engine refuses (bad image, prompt too long, ...) gets `status_code` 400 and an
OpenAI error body; a line that is no request at all (bad JSON, no custom_id, unknown url, a
duplicate custom_id) gets `response: null` and `error: {"code", "message", "line"}`.

Input is read as the engine has room (at most `window` lines in flight); each finished line is
appended and flushed at once, in the order lines finish. Rerunning the same command resumes:

```
OUT.jsonl after a kill:  line | line | line | half-writ      <- cut back to the last newline
rerun:                   skips the custom_ids (and bad input lines) already answered
```
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from vlmx.engine.engine import LLMEngine
from vlmx.entrypoints.openai import convert
from vlmx.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    random_id,
)
from vlmx.outputs import RequestOutput
from vlmx.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

BODY_TYPES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
DUPLICATE = "duplicate_custom_id"
PROCESS_THREADS = 2


@dataclass(slots=True)
class BatchRequest:
    """One valid input line."""

    line: int  # 1-based line number in the input
    custom_id: str
    url: str
    body: ChatCompletionRequest | CompletionRequest


class BadLine(ValueError):
    """An input line that is not a request; answered with an `error` line."""

    def __init__(self, line: int, custom_id: str | None, code: str, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.custom_id = custom_id
        self.code = code


def parse_line(line: int, text: str) -> BatchRequest:
    """An input line -> `BatchRequest`; raises `BadLine` naming what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(line, None, "invalid_json", f"line {line} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadLine(line, None, "invalid_line", f"line {line} is not a JSON object")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(line, None, "invalid_line", f"line {line} has no custom_id (a string)")
    url, method = data.get("url"), data.get("method", "POST")
    if url not in BODY_TYPES or str(method).upper() != "POST":
        raise BadLine(
            line,
            custom_id,
            "invalid_url",
            f"line {line}: {method} {url!r} is not supported; use POST with url "
            f"{' or '.join(map(repr, BODY_TYPES))}",
        )
    try:
        body = BODY_TYPES[url].model_validate(data.get("body"))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise BadLine(line, custom_id, "invalid_body", f"line {line}: {problems}") from None
    if body.stream:
        raise BadLine(line, custom_id, "invalid_body", f"line {line}: stream=true in a batch")
    return BatchRequest(line, custom_id, url, body)


def request_inputs(
    context: convert.PromptContext, request: BatchRequest
) -> tuple[dict[str, Any], SamplingParams]:
    """The prompt dict and SamplingParams of a request (ValueError if they are bad)."""
    params = convert.sampling_params(request.body, context.default_sampling)
    if isinstance(request.body, ChatCompletionRequest):
        return convert.chat_prompt(context, request.body), params
    return convert.completion_prompt(request.body), params


def response_line(request: BatchRequest, output: RequestOutput, model: str) -> dict[str, Any]:
    response_id = random_id("chatcmpl" if request.url.endswith("chat/completions") else "cmpl")
    if isinstance(request.body, ChatCompletionRequest):
        body = convert.chat_response(output, request.body, model, response_id)
    else:
        body = convert.completion_response(output, request.body, model, response_id)
    return _line(request.custom_id, 200, response_id, body.model_dump(), None)


def refused_line(request: BatchRequest, message: str) -> dict[str, Any]:
    """A request the engine refused: as the server answers it (400, OpenAI error body)."""
    info = ErrorInfo(message=message, type="BadRequestError", code=400)
    body = ErrorResponse(error=info).model_dump()
    return _line(request.custom_id, 400, random_id("vlmx-batch"), body, None)


def bad_line(e: BadLine) -> dict[str, Any]:
    error = {"code": e.code, "message": str(e), "line": e.line}
    return {"id": random_id("vlmx"), "custom_id": e.custom_id, "response": None, "error": error}


def _line(custom_id, status, request_id, body, error) -> dict[str, Any]:
    response = {"status_code": status, "request_id": request_id, "body": body}
    return {"id": random_id("vlmx"), "custom_id": custom_id, "response": response, "error": error}


# -- resuming ---------------------------------------------------------------------------------


@dataclass
class Done:
    """What an earlier run's output already answers."""

    custom_ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)  # bad lines without a custom_id
    duplicates: Counter = field(default_factory=Counter)  # custom_id -> duplicate lines answered
    num_lines: int = 0


def read_done(path: str) -> Done:
    """The answered lines of `path` (missing: none). A last line cut short by a kill is cut off
    the file, so that appending goes on from a whole line."""
    done = Done()
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as f:
        whole_end = 0  # where the last whole line ends
        for raw in f:
            if not raw.endswith(b"\n"):
                logger.warning("%s: dropping a half-written last line (%d bytes)", path, len(raw))
                f.truncate(whole_end)
                break
            whole_end += len(raw)
            _note_done(done, raw, path)
    return done


def _note_done(done: Done, raw: bytes, path: str) -> None:
    try:
        line = json.loads(raw)
        custom_id, error = line.get("custom_id"), line.get("error") or {}
    except (json.JSONDecodeError, AttributeError):
        logger.warning("%s: skipping an unreadable line %r", path, raw[:80])
        return
    done.num_lines += 1
    if error.get("code") == DUPLICATE:
        done.duplicates[custom_id] += 1
    elif custom_id is None:
        done.lines.add(error.get("line"))
    else:
        done.custom_ids.add(custom_id)


def count_lines(path: str) -> int:
    """Non-empty lines of `path`, read in chunks (for the progress bar's total)."""
    num, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            num += chunk.count(b"\n")
            last = chunk[-1:]
    return num + (last != b"\n")


def read_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line, read lazily."""
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield number, text


def triage(
    number: int, text: str, done: Done, seen: Counter
) -> BatchRequest | dict[str, Any] | None:
    """What one input line needs: a `BatchRequest` to run, an answer line to write at once (a
    bad line, a duplicate custom_id), or None (an earlier run answered it). `seen` counts the
    custom_ids read so far (updated here); shared by the engine and the Ray paths."""
    request, bad = None, None
    try:
        request = parse_line(number, text)
        custom_id = request.custom_id
    except BadLine as e:
        bad, custom_id = e, e.custom_id
    if custom_id is None:  # NOTE: such a line is known by its number
        return None if number in done.lines else bad_line(bad)
    seen[custom_id] += 1
    occurrence = seen[custom_id]
    if occurrence > 1:
        if occurrence - 1 <= done.duplicates[custom_id]:
            return None
        message = (
            f"line {number}: custom_id {custom_id!r} is a duplicate of an earlier line; "
            "give every line its own custom_id"
        )
        return bad_line(BadLine(number, custom_id, DUPLICATE, message))
    if custom_id in done.custom_ids:
        return None
    return bad_line(bad) if bad is not None else request


# -- the run ----------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    num_ok: int = 0
    num_errors: int = 0
    num_skipped: int = 0  # answered by an earlier run
    num_images: int = 0
    seconds: float = 0.0
    max_lines_in_flight: int = 0  # read but not yet written; bounded by the window

    def describe(self) -> str:
        total = self.num_ok + self.num_errors
        rate = total / max(self.seconds, 1e-9)
        return (
            f"run-batch: {total} lines answered ({self.num_ok} ok, {self.num_errors} errors), "
            f"{self.num_skipped} already done, in {self.seconds:.1f} s ({rate:.2f} requests/s, "
            f"{self.num_images / max(self.seconds, 1e-9):.2f} images/s)"
        )


class BatchRunner:
    """Feeds one file's requests to `engine` with at most `window` lines in flight."""

    def __init__(
        self,
        engine: LLMEngine,
        model_name: str,
        window: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.window = window or 2 * engine.config.scheduler_config.max_num_seqs
        if self.window < 1:
            raise ValueError(f"the window must be >= 1, got {self.window}")
        self.context = convert.prompt_context(engine, chat_template)
        self.pool = ThreadPoolExecutor(PROCESS_THREADS, thread_name_prefix="vlmx-batch")

    @torch.inference_mode()
    def run(self, in_path: str, out_path: str, progress: bool = True) -> BatchSummary:
        from tqdm import tqdm

        start = time.perf_counter()
        done = read_done(out_path)
        summary = BatchSummary(num_skipped=0)
        total = count_lines(in_path)
        bar = tqdm(total=total, desc="run-batch", unit="req", disable=None if progress else True)
        bar.update(done.num_lines)
        with open(out_path, "a", encoding="utf-8") as out:
            state = _RunState(self, done, out, bar, summary)
            try:
                state.loop(read_lines(in_path))
            finally:
                state.abort_all()
                bar.close()
        summary.num_skipped = done.num_lines
        summary.seconds = time.perf_counter() - start
        return summary


def write_answer(out, line: dict[str, Any], summary: BatchSummary, bar) -> None:
    """Append one answer line to `out` and flush; count it in `summary` and on `bar`."""
    out.write(json.dumps(line, ensure_ascii=False) + "\n")
    out.flush()
    ok = line["error"] is None and line["response"]["status_code"] == 200
    if ok:
        summary.num_ok += 1
    else:
        summary.num_errors += 1
    bar.update(1)
    elapsed = max(bar.format_dict.get("elapsed", 0.0), 1e-9)
    bar.set_postfix(img_s=f"{summary.num_images / elapsed:.1f}", refresh=False)


class _RunState:
    """One run's moving parts: the lines being processed, those in the engine, the output."""

    def __init__(self, runner: BatchRunner, done: Done, out, bar, summary: BatchSummary):
        self.runner = runner
        self.engine = runner.engine
        self.done = done
        self.out = out
        self.bar = bar
        self.summary = summary
        self.seen: Counter = Counter()  # custom_id -> lines of it read so far
        # lines read, processing on the pool: (request, future of (text, processed) or error)
        self.ahead: deque[tuple[BatchRequest, Future]] = deque()
        self.in_engine: dict[str, BatchRequest] = {}  # engine request id -> request
        self.num_read = 0
        self.num_written = 0

    def loop(self, lines: Iterator[tuple[int, str]]) -> None:
        exhausted = False
        while not exhausted or self.ahead or self.in_engine:
            while not exhausted and len(self.ahead) + len(self.in_engine) < self.runner.window:
                item = next(lines, None)
                if item is None:
                    exhausted = True
                    break
                self._read(*item)
            self._queue_processed()
            if self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    request = self.in_engine.pop(output.request_id)
                    self._write(response_line(request, output, self.runner.model_name))
            elif self.ahead:
                self.ahead[0][1].exception()  # NOTE: nothing to step: wait for the next prompt

    def _read(self, number: int, text: str) -> None:
        self.num_read += 1
        verdict = triage(number, text, self.done, self.seen)
        if isinstance(verdict, BatchRequest):
            self.ahead.append((verdict, self.runner.pool.submit(self._process, verdict)))
        elif verdict is not None:
            self._write(verdict)

    def _process(self, request: BatchRequest):
        prompt, params = request_inputs(self.runner.context, request)
        text, processed = self.engine.process_prompt(prompt)
        return text, processed, params

    def _queue_processed(self) -> None:
        """Move processed lines, in input order, into the engine."""
        while self.ahead and self.ahead[0][1].done():
            request, future = self.ahead.popleft()
            request_id = f"batch-{request.line}-{uuid.uuid4().hex[:8]}"
            try:
                text, processed, params = future.result()
                self.engine.add_processed_request(request_id, text, processed, params)
            except ValueError as e:
                self._write(refused_line(request, str(e)))
                continue
            except Exception as e:  # a gap in validation must not cost the batch
                logger.exception("line %d failed", request.line)
                self._write(refused_line(request, f"{type(e).__name__}: {e}"))
                continue
            self.summary.num_images += len(processed.mm_features)
            self.in_engine[request_id] = request

    def _write(self, line: dict[str, Any]) -> None:
        self.summary.max_lines_in_flight = max(
            self.summary.max_lines_in_flight, self.num_read - self.num_written
        )
        write_answer(self.out, line, self.summary, self.bar)
        self.num_written += 1

    def abort_all(self) -> None:
        for future in (f for _, f in self.ahead):
            future.cancel()
        for request_id in self.in_engine:
            self.engine.abort_request(request_id)
