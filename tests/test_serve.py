"""`vlmx serve` on loopback, through the official `openai` client: chat with images, streaming
equal to not streaming, usage, logprobs, n, seed, stop, completions, every error class, the API
key, the media URL policy, metrics, client disconnects, and 16 concurrent streams equal to
`llm.chat`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import time
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.loopback import serve
from tests.openai_server import running_server
from vlmx import LLM, SamplingParams
from vlmx.demo.images import structured_image
from vlmx.engine.engine import LLMEngine
from vlmx.engine.engine_args import EngineArgs
from vlmx.entrypoints.openai.api_server import ServerArgs

ENGINE_KWARGS = dict(
    model="demo",
    max_model_len=1024,
    max_num_seqs=16,
    limit_mm_per_prompt={"image": 2},
    # NOTE: VLMX_TEST_DEVICE=cuda runs these on a GPU; keep float32 there, so that greedy answers
    # are equal across batch shapes (bfloat16 near-ties of the random demo model flip).
    device=os.environ.get("VLMX_TEST_DEVICE", "cpu"),
    dtype=os.environ.get("VLMX_TEST_DTYPE", "float32"),
)
API_KEY = "test-key"


def _png(width: int, height: int, variant: int) -> bytes:
    buf = io.BytesIO()
    structured_image(width, height, variant).save(buf, format="PNG")
    return buf.getvalue()


PNG_A = _png(64, 96, 0)
PNG_B = _png(96, 64, 1)
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG_A).decode()


class _Images(BaseHTTPRequestHandler):
    """/b.png: an image; /to-localhost: a redirect to the same image under the name localhost."""

    def do_GET(self) -> None:
        if self.path == "/b.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG_B)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(PNG_B)
            return
        if self.path == "/to-localhost":
            port = self.server.server_address[1]
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/b.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_host():
    with serve(_Images) as base:
        yield base


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    inside = tmp_path_factory.mktemp("allowed")
    (inside / "a.png").write_bytes(PNG_A)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "a.png").write_bytes(PNG_A)
    return SimpleNamespace(inside=inside, outside=outside)


@pytest.fixture(scope="module")
def llm():
    return LLM(**ENGINE_KWARGS)


@pytest.fixture(scope="module")
def server(media_dir):
    engine = LLMEngine(EngineArgs(**ENGINE_KWARGS).create_engine_config())
    args = ServerArgs(
        served_model_name=["demo", "vlmx-demo"],
        api_key=API_KEY,
        allowed_media_domains=["127.0.0.1"],
        allowed_local_media_path=str(media_dir.inside),
    )
    with running_server(engine, args) as (base, app):
        yield SimpleNamespace(base=base, app=app, engine=engine)


@pytest.fixture
def client(server):
    return openai.OpenAI(
        base_url=f"{server.base}/v1",
        api_key=API_KEY,
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=120),
    )


def _greedy(llm: LLM, max_tokens: int) -> SamplingParams:
    """Greedy with the checkpoint's other defaults (its repetition_penalty), as the server fills
    in the fields a request leaves out."""
    defaults = llm.llm_engine.default_sampling_kwargs
    return SamplingParams(**{**defaults, "temperature": 0.0, "max_tokens": max_tokens})


def _two_image_messages(image_host: str, text: str = "What differs between them?") -> list:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": DATA_URL}},
                {"type": "image_url", "image_url": {"url": f"{image_host}/b.png"}},
                {"type": "text", "text": text},
            ],
        }
    ]


def _user(text: str) -> list:
    return [{"role": "user", "content": text}]


def _post(server, path: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{server.base}{path}", json=body, headers=headers, trust_env=False, timeout=60
    )


def _metrics(server) -> dict[str, float]:
    """Each sample name -> its value summed over labels."""
    text = httpx.get(f"{server.base}/metrics", trust_env=False).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
    return values


def _stream_texts(stream, n: int = 1) -> tuple[list[str], list[str | None], list]:
    texts, finish, chunks = [""] * n, [None] * n, []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            delta = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] += delta or ""
            if choice.finish_reason is not None:
                assert finish[choice.index] is None, "two finish reasons for one choice"
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


# -- answers --------------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo", "vlmx-demo"]
    assert httpx.get(f"{server.base}/health", trust_env=False).status_code == 200


def test_chat_with_two_images_equals_llm_chat(client, llm, image_host):
    messages = _two_image_messages(image_host)
    response = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=12, temperature=0
    )
    reference = llm.chat(messages, _greedy(llm, 12), use_tqdm=False)[0]
    assert response.choices[0].message.content == reference.outputs[0].text
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == reference.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(reference.prompt_token_ids)
    assert response.usage.completion_tokens == len(reference.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    text_only = client.chat.completions.create(
        model="demo", messages=_user("What differs between them?"), max_tokens=1, temperature=0
    )
    assert response.usage.prompt_tokens > text_only.usage.prompt_tokens + 2  # the images' tokens


def test_stream_equals_non_stream_with_usage_and_logprobs(client, image_host):
    kwargs = dict(
        model="vlmx-demo",
        messages=_two_image_messages(image_host, "Describe both."),
        max_completion_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    texts, finish, chunks = _stream_texts(stream)
    assert texts[0] == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    streamed = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    whole = full.choices[0].logprobs.content
    assert len(whole) == full.usage.completion_tokens == 16
    assert [t.token for t in streamed] == [t.token for t in whole]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-4)
    for token in whole:
        tops = [t.logprob for t in token.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert token.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy takes the top one


def test_n2_with_seed_is_reproducible_and_streams_the_same(client):
    # NOTE: top_p and top_k given, else the checkpoint's (top_k=1) would make it greedy.
    kwargs = dict(
        model="demo",
        messages=_user("Tell a story."),
        max_tokens=10,
        temperature=1.0,
        top_p=1.0,
        extra_body={"top_k": 0},
    )
    first = client.chat.completions.create(**kwargs, n=2, seed=123)
    again = client.chat.completions.create(**kwargs, n=2, seed=123)
    other = client.chat.completions.create(**kwargs, n=2, seed=7)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]
    assert texts != [c.message.content for c in other.choices]
    assert first.usage.completion_tokens == 20
    streamed, finish, _ = _stream_texts(
        client.chat.completions.create(**kwargs, n=2, seed=123, stream=True), n=2
    )
    assert streamed == texts and finish == ["length", "length"]


def test_stop_string_cuts_the_answer(client):
    kwargs = dict(model="demo", messages=_user("Count to ten."), max_tokens=16, temperature=0)
    base = client.chat.completions.create(**kwargs).choices[0].message.content
    start = next(i for i in range(3, len(base) - 2) if base.find(base[i : i + 2]) == i)
    stop = base[start : start + 2]
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].message.content == base[:start]
    assert cut.choices[0].finish_reason == "stop"
    streamed, finish, _ = _stream_texts(
        client.chat.completions.create(**kwargs, stop=stop, stream=True)
    )
    assert streamed == [base[:start]] and finish == ["stop"]


def test_completions_equal_llm_generate(client, llm):
    prompt = "The quick brown fox"
    response = client.completions.create(
        model="demo", prompt=prompt, max_tokens=10, temperature=0, logprobs=2
    )
    reference = llm.generate(prompt, _greedy(llm, 10), use_tqdm=False)[0]
    choice = response.choices[0]
    assert choice.text == reference.outputs[0].text
    assert response.usage.prompt_tokens == len(reference.prompt_token_ids)
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 10
    assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    streamed, finish, _ = _stream_texts(
        client.completions.create(
            model="demo", prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
    )
    assert streamed == [choice.text] and finish == [choice.finish_reason]
    ids = llm.get_tokenizer().encode(prompt)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == choice.text


# -- errors ---------------------------------------------------------------------------------

_BAD_REQUESTS = {
    "bad image": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {"type": "text", "text": "x"},
                    ],
                }
            ]
        },
        400,
        "image",
    ),
    "too many images": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}] * 3,
                }
            ]
        },
        400,
        "limit_mm_per_prompt",
    ),
    "prompt too long": ({"messages": _user("word " * 3000)}, 400, "max_model_len"),
    "bad temperature": ({"messages": _user("hi"), "temperature": -1}, 400, "temperature"),
    "bad top_p": ({"messages": _user("hi"), "top_p": 1.5}, 400, "top_p"),
    "bad max_tokens": ({"messages": _user("hi"), "max_tokens": 0}, 400, "max_tokens"),
    "too many logprobs": (
        {"messages": _user("hi"), "logprobs": True, "top_logprobs": 50},
        400,
        "max_logprobs",
    ),
    "bad content part": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}
            ]
        },
        400,
        "not supported",
    ),
    "no role": ({"messages": [{"content": "hi"}]}, 400, "role"),
    "field of wrong type": ({"messages": _user("hi"), "max_tokens": "many"}, 400, "max_tokens"),
    "messages not a list": ({"messages": "hi"}, 400, "messages"),
    "unknown model": ({"messages": _user("hi"), "model": "gpt-4o"}, 404, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(_BAD_REQUESTS))
def test_each_bad_request_gets_its_status_and_the_server_goes_on(server, case):
    body, status, words = _BAD_REQUESTS[case]
    response = _post(server, "/v1/chat/completions", {"model": "demo", **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and words in error["message"], error
    ok = _post(
        server, "/v1/chat/completions", {"model": "demo", "messages": _user("hi"), "max_tokens": 2}
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_completion_errors(server):
    bad = _post(server, "/v1/completions", {"model": "demo", "prompt": "x", "temperature": -1})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    two = _post(server, "/v1/completions", {"model": "demo", "prompt": ["a", "b"]})
    assert two.status_code == 400 and "one prompt" in two.json()["error"]["message"]
    unknown = _post(server, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404


def test_api_key(server):
    for key in (None, "wrong"):
        response = _post(server, "/v1/chat/completions", {"messages": _user("hi")}, key=key)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.base}/v1/models", trust_env=False).status_code == 401
    assert httpx.get(f"{server.base}/health", trust_env=False).status_code == 200
    wrong = openai.OpenAI(
        base_url=f"{server.base}/v1",
        api_key="wrong",
        max_retries=0,
        http_client=httpx.Client(trust_env=False),
    )
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="demo", messages=_user("hi"), max_tokens=2)
    assert (
        _post(
            server, "/v1/chat/completions", {"messages": _user("hi"), "max_tokens": 2}
        ).status_code
        == 200
    )


# -- media policy ---------------------------------------------------------------------------


def _image_message(url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def test_media_policy_through_the_server(server, image_host, media_dir):
    port = image_host.rsplit(":", 1)[1]
    assert (
        _post(server, "/v1/chat/completions", _image_message(f"{image_host}/b.png")).status_code
        == 200
    )
    cases = {
        f"http://localhost:{port}/b.png": "allowed-media-domains",  # not listed
        f"{image_host}/to-localhost": "redirect refused",  # a listed host redirecting elsewhere
        (media_dir.outside / "a.png").as_uri(): "allowed-local-media-path",
        str(media_dir.outside / "a.png"): "allowed-local-media-path",
        (media_dir.inside / ".." / media_dir.outside.name / "a.png").as_uri(): "outside",
        "ftp://example.com/a.png": "scheme",
    }
    for url, words in cases.items():
        response = _post(server, "/v1/chat/completions", _image_message(url))
        assert response.status_code == 400, (url, response.text)
        assert words in response.json()["error"]["message"], (url, response.json())
    inside = _post(
        server, "/v1/chat/completions", _image_message((media_dir.inside / "a.png").as_uri())
    )
    assert inside.status_code == 200, inside.text


# -- metrics, disconnects -------------------------------------------------------------------


def test_metrics_move(server, client, image_host):
    before = _metrics(server)
    response = client.chat.completions.create(
        model="demo", messages=_two_image_messages(image_host), max_tokens=5, temperature=0
    )
    after = _metrics(server)
    assert (
        after["vlmx:prompt_tokens_total"] - before["vlmx:prompt_tokens_total"]
        == response.usage.prompt_tokens
    )
    assert after["vlmx:generation_tokens_total"] - before["vlmx:generation_tokens_total"] == 5
    assert after["vlmx:mm_images_total"] - before["vlmx:mm_images_total"] == 2
    ttft = "vlmx:time_to_first_token_seconds_count"
    assert after[ttft] - before[ttft] == 1
    assert after["vlmx:request_success_total"] - before["vlmx:request_success_total"] == 1
    for name in (
        "vlmx:num_requests_running",
        "vlmx:num_requests_waiting",
        "vlmx:kv_cache_usage_perc",
    ):
        assert name in after
    _post(server, "/v1/chat/completions", {"messages": _user("hi"), "temperature": -1})
    assert _metrics(server)["vlmx:request_errors_total"] > before.get(
        "vlmx:request_errors_total", 0
    )


def _wait_idle(engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.scheduler.requests or engine.requests:
        assert time.monotonic() < deadline, "the aborted request is still in the engine"
        time.sleep(0.02)
    time.sleep(0.05)
    pool = engine.scheduler.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not any(engine.scheduler.kv_cache.req_blocks.values())
    engine.scheduler.check_integrity()


def test_client_leaving_mid_stream_aborts_and_frees_kv(server):
    engine = server.engine
    body = {
        "model": "demo",
        "messages": _user("Go on."),
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    before = _metrics(server)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(trust_env=False, timeout=60) as http,
        http.stream(
            "POST", f"{server.base}/v1/chat/completions", json=body, headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        num_chunks = 0
        for line in lines:
            num_chunks += line.startswith("data:")
            if num_chunks >= 4:
                break
        running = _metrics(server)
        assert running["vlmx:num_requests_running"] == 1
        assert running["vlmx:kv_cache_usage_perc"] > 0
        assert engine.scheduler.requests
    _wait_idle(engine)
    after = _metrics(server)
    assert after["vlmx:generation_tokens_total"] == before["vlmx:generation_tokens_total"]


def test_client_leaving_a_plain_request_aborts_it(server):
    body = {"model": "demo", "messages": _user("Go on."), "max_tokens": 900, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base}/v1/chat/completions",
            json=body,
            headers=headers,
            trust_env=False,
            timeout=1.0,
        )
    _wait_idle(server.engine)


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(server, monkeypatch):
    engine = server.engine
    real_step = engine.step
    calls = []

    def failing_step():
        if not calls:
            calls.append(1)
            raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    body = {"model": "demo", "messages": _user("hi"), "max_tokens": 3}
    failed = _post(server, "/v1/chat/completions", body)
    assert failed.status_code == 500 and "injected failure" in failed.json()["error"]["message"]
    _wait_idle(engine)
    assert _post(server, "/v1/chat/completions", body).status_code == 200


# -- load -----------------------------------------------------------------------------------


def test_16_concurrent_streams_equal_llm_chat(server, llm, image_host):
    conversations = []
    for i in range(16):
        content: list = [{"type": "text", "text": f"Question {i}: what is item {i * 7}?"}]
        if i % 2:
            content.insert(
                0,
                {
                    "type": "image_url",
                    "image_url": {"url": DATA_URL if i % 4 == 1 else f"{image_host}/b.png"},
                },
            )
        conversations.append([{"role": "user", "content": content}])
    references = llm.chat(conversations, _greedy(llm, 20), use_tqdm=False)
    client = openai.AsyncOpenAI(
        base_url=f"{server.base}/v1",
        api_key=API_KEY,
        max_retries=0,
        http_client=httpx.AsyncClient(trust_env=False, timeout=120),
    )

    async def one(messages) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model="demo", messages=messages, max_tokens=20, temperature=0, stream=True
        )
        text, finish = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, finish

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(c) for c in conversations))
        finally:
            await client.close()

    server.engine.step_log = []
    try:
        results = asyncio.run(all_of_them())
        max_batch = max(r.num_requests for r in server.engine.step_log)
    finally:
        server.engine.step_log = None
    assert [t for t, _ in results] == [r.outputs[0].text for r in references]
    assert [f for _, f in results] == [r.outputs[0].finish_reason for r in references]
    assert max_batch >= 8  # one engine loop batched the connections together


def test_async_scheduling_streams_the_same(llm, image_host):
    """Async scheduling (the CUDA default) reserves each sample before it is read: streams must
    skip the placeholder, and match the plain answers and `llm.chat`."""
    engine = LLMEngine(EngineArgs(**ENGINE_KWARGS, async_scheduling=True).create_engine_config())
    assert engine.config.async_scheduling
    with running_server(engine, ServerArgs(allowed_media_domains=["127.0.0.1"])) as (base, _):
        client = openai.OpenAI(
            base_url=f"{base}/v1",
            api_key="none",
            max_retries=0,
            http_client=httpx.Client(trust_env=False, timeout=120),
        )
        messages = _two_image_messages(image_host, "Async?")
        kwargs = dict(model="demo", messages=messages, max_tokens=12, temperature=0)
        full = client.chat.completions.create(**kwargs, logprobs=True)
        streamed, finish, chunks = _stream_texts(
            client.chat.completions.create(**kwargs, stream=True, logprobs=True)
        )
        reference = llm.chat(messages, _greedy(llm, 12), use_tqdm=False)[0]
        assert streamed == [full.choices[0].message.content] == [reference.outputs[0].text]
        tokens = [
            t.token
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.content
        ]
        assert tokens == [t.token for t in full.choices[0].logprobs.content]
        sampled = dict(
            model="demo",
            messages=_user("Story?"),
            max_tokens=8,
            temperature=1.0,
            top_p=1.0,
            n=2,
            seed=3,
            extra_body={"top_k": 0},
        )
        plain = [c.message.content for c in client.chat.completions.create(**sampled).choices]
        assert (
            _stream_texts(client.chat.completions.create(**sampled, stream=True), n=2)[0] == plain
        )
        long = client.chat.completions.create(
            model="demo",
            messages=_user("Go on."),
            max_tokens=500,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for num_chunks, _ in enumerate(long):
            if num_chunks == 4:
                break
        long.close()  # the client leaves mid-stream, with a step in flight
        _wait_idle(engine)
