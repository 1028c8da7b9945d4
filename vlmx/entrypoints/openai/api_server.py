"""`vlmx serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine.

```
GET  /health               200 once the engine is built (no API key needed)
GET  /metrics              Prometheus text (no API key needed)
GET  /v1/models            the served model names
POST /v1/chat/completions  messages with text and image_url parts; stream or not
POST /v1/completions       one prompt (text or token ids); stream or not
```
Errors are OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
request (bad image, too many images, prompt too long, bad sampling values, bad content part, a
field of the wrong type), 404 for an unknown model, 401 for a missing or wrong API key.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from vlmx.engine.engine import LLMEngine
from vlmx.entrypoints.openai.async_engine import AsyncEngine, EngineError
from vlmx.entrypoints.openai.convert import prompt_context
from vlmx.entrypoints.openai.metrics import ServerMetrics
from vlmx.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from vlmx.entrypoints.openai.serving import APIError, OpenAIServing, error_response
from vlmx.multimodal.url_policy import MediaURLPolicy

logger = logging.getLogger(__name__)


@dataclass
class ServerArgs:
    """The server's own options (the engine's are `EngineArgs`), spelled as vLLM's."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: list[str] = field(default_factory=list)  # empty: the --model given
    api_key: str | None = None
    chat_template: str | None = None
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] = field(default_factory=list)
    uvicorn_log_level: str = "info"


def create_app(engine: LLMEngine, args: ServerArgs) -> FastAPI:
    """The app over a built engine. The engine's loader gets the server's media URL policy;
    the engine thread starts with the app and stops when it shuts down."""
    names = args.served_model_name or [engine.config.model_config.model]
    engine.media.url_policy = MediaURLPolicy.create(
        args.allowed_media_domains, args.allowed_local_media_path
    )
    metrics = ServerMetrics(names[0])
    context = prompt_context(engine, args.chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.async_engine = AsyncEngine(engine, metrics)
        app.state.serving = OpenAIServing(app.state.async_engine, context, names)
        try:
            yield
        finally:
            app.state.async_engine.shutdown()

    app = FastAPI(title="vlmx", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    _add_error_handlers(app, metrics)
    v1 = _key_check(args.api_key)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=v1)
    async def models() -> JSONResponse:
        mc = engine.config.model_config
        cards = [ModelCard(id=n, root=mc.model, max_model_len=mc.max_model_len) for n in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await app.state.serving.chat(body, request)

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await app.state.serving.completion(body, request)

    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        metrics.on_error(e.status_code)
        return e.response()

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError) -> JSONResponse:
        metrics.on_error(500)
        return error_response(500, str(e), "InternalServerError")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        metrics.on_error(400)
        errors = e.errors()
        parts = []
        for err in errors:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        first = errors[0].get("loc", ()) if errors else ()
        param = ".".join(str(x) for x in first if x != "body") or None
        return error_response(400, "; ".join(parts), "BadRequestError", param)


def _key_check(api_key: str | None) -> list:
    """The dependencies of the /v1 routes: with an API key, a check of the Authorization
    header (401 when it is missing or wrong); none without one."""
    if not api_key:
        return []
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "missing or wrong API key", "AuthenticationError", "Authorization")

    return [Depends(check)]


def run_server(engine: LLMEngine, args: ServerArgs) -> None:
    """Serve until interrupted (uvicorn handles SIGINT / SIGTERM)."""
    import uvicorn

    app = create_app(engine, args)
    model = engine.config.model_config.model
    logger.info("serving %s on http://%s:%d", model, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
