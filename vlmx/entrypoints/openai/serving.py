"""The chat and completion endpoints: body -> engine request -> JSON body or an SSE stream.

```
POST body --(model known? sampling_params, prompt)--> AsyncEngine.add --> RequestHandle
   stream=false: wait for the RequestOutput (abort if the client leaves) -> chat_response
   stream=true:  data: {chunk with role}  data: {chunk per StreamDelta} ...
                 [data: {chunk with usage only}]  data: [DONE]
```
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vlmx.entrypoints.openai import convert
from vlmx.entrypoints.openai.async_engine import AsyncEngine, RequestHandle, StreamDelta
from vlmx.entrypoints.openai.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    random_id,
)
from vlmx.outputs import RequestOutput

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is there


class APIError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(self, status_code: int, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.kind = kind
        self.param = param

    def response(self) -> JSONResponse:
        return error_response(self.status_code, str(self), self.kind, self.param)


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "BadRequestError", param)


def _sse(payload: Any) -> str:
    text = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {text}\n\n"


@dataclass
class OpenAIServing:
    engine: AsyncEngine
    context: convert.PromptContext
    served_model_names: list[str]

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise APIError(
                404,
                f"The model {model!r} does not exist; this server serves "
                f"{', '.join(repr(m) for m in self.served_model_names)}",
                "NotFoundError",
                "model",
            )

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.chat_template is not None:
            raise bad_request(
                "chat_template in a request is not accepted by this server (it runs a template "
                "the client wrote); start the server with --chat-template instead",
                "chat_template",
            )
        context = self.context
        response_id = random_id("chatcmpl")
        handle = await self._add(
            response_id, body, lambda: convert.chat_prompt(context, body), body.stream
        )
        if body.stream:
            return self._stream(handle, self._chat_chunks(handle, body, response_id))
        output = await self._final_output(handle, request)
        return JSONResponse(
            convert.chat_response(output, body, self.model_name, response_id).model_dump()
        )

    async def completion(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        response_id = random_id("cmpl")
        prompt = self._checked(lambda: convert.completion_prompt(body))
        handle = await self._add(response_id, body, lambda: prompt, body.stream)
        if body.stream:
            return self._stream(handle, self._completion_chunks(handle, body, response_id))
        output = await self._final_output(handle, request)
        return JSONResponse(
            convert.completion_response(output, body, self.model_name, response_id).model_dump()
        )

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _checked(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ValueError as e:
            raise bad_request(str(e)) from None

    async def _add(
        self,
        request_id: str,
        body: ChatCompletionRequest | CompletionRequest,
        build_prompt: Callable[[], Any],
        stream: bool,
    ) -> RequestHandle:
        defaults = self.context.default_sampling
        params = self._checked(lambda: convert.sampling_params(body, defaults))
        try:
            return await self.engine.add(request_id, build_prompt, params, stream)
        except ValueError as e:
            raise bad_request(str(e)) from None

    async def _final_output(self, handle: RequestHandle, request: Request) -> RequestOutput:
        async def collect() -> RequestOutput:
            async for item in handle:
                if isinstance(item, RequestOutput):
                    return item
            raise AssertionError("a request ended without its output")

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    logger.info("client left; aborting %s", handle.request_id)
                    raise APIError(499, "client disconnected", "ClientDisconnected")
        finally:
            task.cancel()
            handle.abort()

    @staticmethod
    def _stream(handle: RequestHandle, chunks: AsyncIterator[str]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as e:  # the engine failed mid-stream: say so in the stream
                logger.exception("stream of %s failed", handle.request_id)
                info = ErrorInfo(message=str(e), type="InternalServerError", code=500)
                yield _sse(ErrorResponse(error=info))
            finally:
                handle.abort()  # NOTE: a client that left mid-stream lands here; frees its KV
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def _chat_chunks(
        self, handle: RequestHandle, body: ChatCompletionRequest, response_id: str
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
            return _sse(
                ChatCompletionChunk(
                    id=response_id, model=self.model_name, choices=choices, usage=usage
                )
            )

        for index in range(body.n):
            yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant"))])
        async for item in handle:
            if isinstance(item, StreamDelta):
                logprobs = None
                if body.logprobs and item.logprobs is not None:
                    logprobs = convert.chat_logprobs(
                        item.token_ids, item.logprobs, body.top_logprobs or 0
                    )
                if not item.text and logprobs is None and item.finish_reason is None:
                    continue
                choice = ChatChunkChoice(
                    index=item.index,
                    delta=DeltaMessage(content=item.text),
                    logprobs=logprobs,
                    finish_reason=item.finish_reason,
                    stop_reason=item.stop_reason,
                )
                yield chunk([choice])
            elif body.stream_options and body.stream_options.include_usage:
                yield chunk([], convert.usage(item))

    async def _completion_chunks(
        self, handle: RequestHandle, body: CompletionRequest, response_id: str
    ) -> AsyncIterator[str]:
        offsets = [0] * body.n
        async for item in handle:
            if isinstance(item, StreamDelta):
                logprobs = None
                if body.logprobs is not None and item.logprobs is not None:
                    logprobs = convert.completion_logprobs(
                        item.token_ids, item.logprobs, body.logprobs, offsets[item.index]
                    )
                offsets[item.index] += len(item.text)
                if not item.text and logprobs is None and item.finish_reason is None:
                    continue
                choice = CompletionChoice(
                    index=item.index,
                    text=item.text,
                    logprobs=logprobs,
                    finish_reason=item.finish_reason,
                    stop_reason=item.stop_reason,
                )
                yield _sse(
                    CompletionResponse(id=response_id, model=self.model_name, choices=[choice])
                )
            elif body.stream_options and body.stream_options.include_usage:
                yield _sse(
                    CompletionResponse(
                        id=response_id, model=self.model_name, choices=[], usage=convert.usage(item)
                    )
                )
