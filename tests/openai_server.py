"""A `vlmx serve` app on a free loopback port, in this process (tests reach its engine)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx

from vlmx.engine.engine import LLMEngine
from vlmx.entrypoints.openai.api_server import ServerArgs, create_app


@contextlib.contextmanager
def running_server(engine: LLMEngine, args: ServerArgs) -> Iterator[tuple[str, object]]:
    """Serve `engine` with uvicorn on 127.0.0.1, port chosen by the OS; yields (base URL, app).
    Stops the server (and its engine thread) on exit."""
    import uvicorn

    app = create_app(engine, args)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(f"{base}/health", trust_env=False).status_code == 200
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
