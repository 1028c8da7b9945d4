"""Bad input gets a `ValueError` that names the cause, and the engine serves everything else.

Every bad prompt below is sent two ways to one engine:

```
(a) engine.add_request("..-before", good)   step()   add_request("..-bad", bad) -> ValueError
    engine.add_request("..-after", good)    run_until_done() -> before and after, as baseline
(b) llm.generate([good, bad, good]) -> InvalidPromptsError: "prompt 1: <cause>",
    .outputs == [out, None, out] (as baseline); the next llm.generate works
```

and the scheduler's integrity is checked after each. Bad checkpoints and engine arguments fail
when the `LLM` is built, naming what is accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from tests.engine_helpers import check_idle
from tests.loopback import serve
from vlmx import LLM, EngineArgs, InvalidPromptsError, RequestOutput, SamplingParams
from vlmx.demo.images import structured_image
from vlmx.models.registry import supported_architectures
from vlmx.multimodal.loader import MediaLoader
from vlmx.multimodal.media import MediaLimits

MAX_MODEL_LEN = 256
PARAMS = SamplingParams(temperature=0.0, max_tokens=2)
VOCAB_SIZE = 151936  # the tiny checkpoints' vocab_size (the embedding rows)
# What a prompt must hold per image; a placeholder mismatch should tell the user to write it.
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_prompt(num_images: int, question: str = "Describe the image.") -> str:
    """A Qwen-VL chat prompt with one <|image_pad|> per image."""
    pads = PLACEHOLDER * num_images
    return f"<|im_start|>user\n{pads}{question}<|im_end|>\n<|im_start|>assistant\n"


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Fixtures: one engine, bad image files, a loopback HTTP server


@pytest.fixture(scope="module")
def module_llm(qwen2_vl_ckpt) -> LLM:
    return LLM(
        model=qwen2_vl_ckpt,
        dtype="float32",
        device="cpu",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=4,
        limit_mm_per_prompt={"image": 1},
    )


@pytest.fixture
def llm(module_llm):
    """The module's LLM; requests a failed test left behind are aborted, so failures stay apart."""
    yield module_llm
    engine = module_llm.llm_engine
    for request_id in [*engine.output_processor.parents, *engine.requests]:
        engine.abort_request(request_id)


class _Handler(BaseHTTPRequestHandler):
    png: bytes  # set on the class by the fixture

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        routes = {
            "/img.png": (200, self.png, "image/png"),
            "/page.html": (
                200,
                b"<!DOCTYPE html><html><body>a photo of a cat</body></html>",
                "text/html; charset=utf-8",
            ),
        }
        status, body, content_type = routes.get(self.path, (404, b"not found", "text/plain"))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


@pytest.fixture(scope="module")
def server_url():
    handler = type("Handler", (_Handler,), {"png": _encode(structured_image(64, 96, 4), "PNG")})
    with serve(handler) as url:
        yield url


@dataclass(frozen=True)
class Inputs:
    """What the cases build their prompts from."""

    files: dict[str, str]  # name -> path
    url: str  # loopback server root
    small: Image.Image  # 64x96: 6 image tokens
    large: Image.Image  # 640x480: 391 image tokens, more than MAX_MODEL_LEN
    tokenizer: Any


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, server_url, module_llm) -> Inputs:
    folder = tmp_path_factory.mktemp("bad-images")
    png = _encode(structured_image(224, 224, 0), "PNG")
    jpeg = _encode(structured_image(224, 224, 1), "JPEG")
    contents = {
        "ok.png": png,
        "garbage.png": bytes(range(256)) * 8,
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.png": b"",
    }
    files = {}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
        files[name] = str(folder / name)
    return Inputs(
        files=files,
        url=server_url,
        small=structured_image(64, 96, 4),
        large=structured_image(640, 480, 3),
        tokenizer=module_llm.get_tokenizer(),
    )


def _good_prompts(inputs: Inputs) -> list[Any]:
    return [
        {"prompt": chat_prompt(1), "multi_modal_data": {"image": inputs.small}},
        "Hello, how are you?",
    ]


@pytest.fixture(scope="module")
def baseline(module_llm, inputs) -> list[list[int]]:
    """Output token ids of the good prompts, run with no bad input around."""
    outputs = module_llm.generate(_good_prompts(inputs), PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Case:
    make: Callable[[Inputs], Any]  # the bad prompt
    # Fragments the message must hold; a callable is given the Inputs.
    causes: tuple[str | Callable[[Inputs], str], ...]
    absent: tuple[str, ...] = ()  # fragments that would mislead here
    media_limits: MediaLimits | None = None  # the engine's image limits, for this case
    params: SamplingParams = field(default_factory=lambda: PARAMS)


def _with_image(image_of: Callable[[Inputs], Any], num_placeholders: int = 1) -> Callable:
    def make(i: Inputs) -> dict:
        return {
            "prompt": chat_prompt(num_placeholders),
            "multi_modal_data": {"image": image_of(i)},
        }

    return make


def _over_by_large_image(i: Inputs) -> str:
    # 640x480 with the checkpoint's min/max pixels, as transformers resizes it: 476x644.
    height, width = smart_resize(480, 640, factor=28, min_pixels=56 * 56, max_pixels=12845056)
    num_image_tokens = height * width // (28 * 28)
    num_tokens = len(i.tokenizer.encode(chat_prompt(1))) - 1 + num_image_tokens
    return f"over max_model_len={MAX_MODEL_LEN} by {num_tokens - MAX_MODEL_LEN + 1}"


CASES = [
    pytest.param(
        Case(
            _with_image(lambda i: i.files["garbage.png"]),
            ("garbage.png", "could not be identified as an image", "PNG, JPEG"),
        ),
        id="garbage-bytes",
    ),
    pytest.param(
        Case(
            _with_image(lambda i: i.files["truncated.png"]),
            ("truncated.png", "truncated or corrupt", "re-encode or re-download"),
        ),
        id="truncated-png",
    ),
    pytest.param(
        Case(
            _with_image(lambda i: i.files["truncated.jpg"]),
            ("truncated.jpg", "truncated or corrupt", "re-encode or re-download"),
        ),
        id="truncated-jpeg",
    ),
    pytest.param(
        Case(_with_image(lambda i: i.files["empty.png"]), ("empty.png", "empty (0 bytes)")),
        id="empty-file",
    ),
    pytest.param(
        Case(
            _with_image(lambda i: i.files["ok.png"]),
            (
                "ok.png",
                "224x224 = 50176 pixels",
                "limit of 10000",
                "image_max_pixels",
                "VLMX_IMAGE_MAX_PIXELS",
            ),
            media_limits=MediaLimits(max_pixels=10000),  # the good prompts' 64x96 image fits
        ),
        id="over-pixel-limit",
    ),
    pytest.param(
        Case(
            _with_image(lambda i: i.url + "/missing.png"),
            ("HTTP error 404", "/missing.png", "check that the URL is right"),
        ),
        id="http-404",
    ),
    pytest.param(
        Case(
            _with_image(lambda i: i.url + "/page.html"),
            ("/page.html", "returned a web page", "text/html", "direct link to the image"),
        ),
        id="http-html",
    ),
    pytest.param(
        Case(
            _with_image(lambda i: [i.small, i.small], num_placeholders=2),
            ("2 images", "limit_mm_per_prompt={'image': 1}", "send fewer images"),
        ),
        id="over-image-limit",
    ),
    pytest.param(
        Case(
            _with_image(lambda i: [i.small], num_placeholders=2),
            ("2 image placeholders (<|image_pad|>)", "1 image", PLACEHOLDER),
        ),
        id="more-placeholders-than-images",
    ),
    pytest.param(
        Case(
            _with_image(lambda i: [i.small], num_placeholders=0),
            ("0 image placeholders (<|image_pad|>)", "1 image", PLACEHOLDER),
        ),
        id="fewer-placeholders-than-images",
    ),
    pytest.param(
        Case(
            lambda i: chat_prompt(1),
            ("1 image placeholders (<|image_pad|>)", "0 image", PLACEHOLDER),
        ),
        id="placeholder-without-image",
    ),
    pytest.param(
        Case(
            _with_image(lambda i: i.large),
            (_over_by_large_image, "for 1 image", "max_model_len", "max_pixels"),
        ),
        id="image-tokens-over-max-model-len",
    ),
    pytest.param(
        Case(
            lambda i: {"prompt_token_ids": [100] * 300},
            ("300 tokens", f"over max_model_len={MAX_MODEL_LEN} by 45", "raise max_model_len"),
            absent=("max_pixels", "images"),  # a text-only prompt has no image to shrink
        ),
        id="text-over-max-model-len",
    ),
    pytest.param(
        Case(
            lambda i: {"prompt_token_ids": [1, 2, VOCAB_SIZE]},
            ("prompt_token_ids", "outside the vocabulary", str(VOCAB_SIZE)),
        ),
        id="token-id-past-vocab",
    ),
    pytest.param(
        Case(
            lambda i: {"prompt_token_ids": [1, -1, 2]},
            ("prompt_token_ids", "outside the vocabulary", "-1"),  # names the bad id
        ),
        id="negative-token-id",
    ),
    # Token ids that are not ints at all: the engine must refuse them with a ValueError too,
    # not a TypeError from comparing them with the vocabulary size.
    pytest.param(
        Case(lambda i: {"prompt_token_ids": ["Hello", "world"]}, ("prompt_token_ids", "int")),
        id="token-ids-are-strings",
    ),
    pytest.param(
        Case(lambda i: {"prompt_token_ids": [1.5, 2.0]}, ("prompt_token_ids", "int")),
        id="token-ids-are-floats",
    ),
    pytest.param(
        Case(lambda i: {"prompt_token_ids": None}, ("prompt_token_ids", "int")),
        id="token-ids-none",
    ),
    pytest.param(
        Case(
            lambda i: {"prompt": chat_prompt(1), "images": [i.small]},
            ("unknown keys ['images']", "multi_modal_data"),
        ),
        id="unknown-prompt-key",
    ),
    pytest.param(
        Case(
            lambda i: {
                "prompt": chat_prompt(0),
                "multi_modal_data": {"video": [np.zeros((2, 28, 28, 3), dtype=np.uint8)]},
            },
            ("multi_modal_data has ['video']", "images only"),
        ),
        id="video-data",
    ),
    pytest.param(
        Case(
            lambda i: "<|vision_start|><|video_pad|><|vision_end|>What happens?",
            ("<|video_pad|>", "images only"),
        ),
        id="video-placeholder",
    ),
    # multi_modal_data given as the image list itself instead of {"image": [...]}.
    pytest.param(
        Case(
            lambda i: {"prompt": chat_prompt(1), "multi_modal_data": [i.small]},
            ("multi_modal_data", "list", "'image'"),
        ),
        id="multi-modal-data-not-a-dict",
    ),
    pytest.param(
        Case(
            lambda i: {
                "prompt": chat_prompt(1),
                "multi_modal_data": {"image": i.small},
                "mm_processor_kwargs": 100352,  # meant {"max_pixels": 100352}
            },
            ("mm_processor_kwargs", "dict"),
        ),
        id="mm-processor-kwargs-not-a-dict",
    ),
    pytest.param(
        Case(
            lambda i: {
                "prompt": chat_prompt(1),
                "multi_modal_data": {"image": i.small},
                "mm_processor_kwargs": {"max_pixel": 100352},
            },
            ("unknown mm_processor_kwargs ['max_pixel']", "max_pixels"),
        ),
        id="unknown-mm-processor-kwarg",
    ),
    pytest.param(
        Case(_with_image(lambda i: 42), ("unsupported image type", "int", "PIL image")),
        id="image-of-unsupported-type",
    ),
    pytest.param(Case(lambda i: "", ("prompt is empty",)), id="empty-prompt"),
    pytest.param(
        Case(lambda i: 17, ("a prompt must be a str or a dict", "got int")), id="prompt-not-str"
    ),
    pytest.param(
        Case(
            lambda i: "Hello",
            ("logprobs=21", "max_logprobs=20"),
            params=SamplingParams(temperature=0.0, max_tokens=2, logprobs=21),
        ),
        id="logprobs-over-max",
    ),
]


def _check_message(message: str, case: Case, inputs: Inputs) -> None:
    for cause in case.causes:
        fragment = cause(inputs) if callable(cause) else cause
        assert fragment in message, f"{fragment!r} not in the message:\n{message}"
    for fragment in case.absent:
        assert fragment not in message, f"{fragment!r} misleads in the message:\n{message}"


def _set_limits(monkeypatch, llm: LLM, case: Case) -> None:
    """The engine loads images under the case's limits (as if built with them)."""
    if case.media_limits is not None:
        monkeypatch.setattr(llm.llm_engine.input_processor, "media", MediaLoader(case.media_limits))


# ---------------------------------------------------------------------------------------------
# Bad prompts


@pytest.mark.parametrize("case", CASES)
def test_add_request_rejects_and_engine_continues(
    llm, inputs, baseline, case, monkeypatch, request
):
    _set_limits(monkeypatch, llm, case)
    engine = llm.llm_engine
    tag = request.node.callspec.id
    good = _good_prompts(inputs)
    engine.add_request(f"{tag}-before", good[0], PARAMS)
    finished = engine.step()  # the first request is running when the bad one comes
    assert engine.has_unfinished_requests()

    with pytest.raises(ValueError) as excinfo:
        engine.add_request(f"{tag}-bad", case.make(inputs), case.params)
    _check_message(str(excinfo.value), case, inputs)
    assert f"{tag}-bad" not in engine.requests
    engine.scheduler.check_integrity()

    engine.add_request(f"{tag}-after", good[1], PARAMS)
    finished += engine.run_until_done()
    token_ids = {o.request_id: o.outputs[0].token_ids for o in finished}
    assert token_ids == {f"{tag}-before": baseline[0], f"{tag}-after": baseline[1]}
    check_idle(llm)
    # The bad request left nothing behind: its id is free again.
    engine.add_request(f"{tag}-bad", good[1], PARAMS)
    assert [o.outputs[0].token_ids for o in engine.run_until_done()] == [baseline[1]]
    check_idle(llm)


@pytest.mark.parametrize("case", CASES)
def test_generate_reports_bad_prompt_and_runs_the_rest(llm, inputs, baseline, case, monkeypatch):
    _set_limits(monkeypatch, llm, case)
    good = _good_prompts(inputs)
    with pytest.raises(InvalidPromptsError) as excinfo:
        llm.generate(
            [good[0], case.make(inputs), good[1]], [PARAMS, case.params, PARAMS], use_tqdm=False
        )
    error = excinfo.value
    assert isinstance(error, ValueError)
    assert set(error.errors) == {1}
    _check_message(error.errors[1], case, inputs)
    message = str(error)
    assert "1 of 3 prompts were invalid" in message
    assert f"prompt 1: {error.errors[1]}" in message
    assert error.outputs[1] is None
    assert all(isinstance(o, RequestOutput) for o in (error.outputs[0], error.outputs[2]))
    assert error.outputs[0].outputs[0].token_ids == baseline[0]
    assert error.outputs[2].outputs[0].token_ids == baseline[1]
    check_idle(llm)

    again = llm.generate(good, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == baseline
    check_idle(llm)


def test_several_bad_prompts_are_all_reported(llm, inputs, baseline):
    good = _good_prompts(inputs)
    prompts = [chat_prompt(1), good[0], {"prompt_token_ids": [VOCAB_SIZE]}, good[1], ""]
    with pytest.raises(InvalidPromptsError) as excinfo:
        llm.generate(prompts, PARAMS, use_tqdm=False)
    error = excinfo.value
    assert sorted(error.errors) == [0, 2, 4]
    assert "3 of 5 prompts were invalid" in str(error)
    for idx in (0, 2, 4):
        assert f"prompt {idx}: " in str(error) and error.outputs[idx] is None
    assert [error.outputs[i].outputs[0].token_ids for i in (1, 3)] == baseline
    check_idle(llm)


@pytest.mark.parametrize(
    ("part", "causes"),
    [
        (
            {"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}},
            ("'video_url'", "video input"),
        ),
        (
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            ("'input_audio'", "audio input"),
        ),
    ],
    ids=["video_url", "input_audio"],
)
def test_chat_unsupported_content_type(llm, inputs, part, causes):
    good = [
        {
            "role": "user",
            "content": [
                {"type": "image_pil", "image_pil": inputs.small},
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ]
    bad = [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}]
    text_only = [{"role": "user", "content": "Hello, how are you?"}]
    expected = llm.chat([good, text_only], PARAMS, use_tqdm=False)

    with pytest.raises(InvalidPromptsError) as excinfo:
        llm.chat([good, bad, text_only], PARAMS, use_tqdm=False)
    error = excinfo.value
    assert set(error.errors) == {1}
    message = error.errors[1]
    for fragment in (*causes, "not supported", "messages[0].content[0]", "'image_url'"):
        assert fragment in message, f"{fragment!r} not in the message:\n{message}"
    assert f"prompt 1: {message}" in str(error)
    assert error.outputs[1] is None
    got = [error.outputs[0].outputs[0].token_ids, error.outputs[2].outputs[0].token_ids]
    assert got == [o.outputs[0].token_ids for o in expected]
    check_idle(llm)
    again = llm.chat(good, PARAMS, use_tqdm=False)
    assert again[0].outputs[0].token_ids == expected[0].outputs[0].token_ids


# ---------------------------------------------------------------------------------------------
# Bad checkpoints and engine arguments


def _build(model: str, **kwargs) -> LLM:
    return LLM(model=model, **({"dtype": "float32", "device": "cpu"} | kwargs))


def test_unsupported_architecture(qwen2_vl_ckpt, tmp_path):
    folder = tmp_path / "unknown"  # (Phi3VForCausalLM was the example until it was supported)
    shutil.copytree(qwen2_vl_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["NoSuchVisionModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as excinfo:
        _build(str(folder))
    message = str(excinfo.value)
    assert "NoSuchVisionModelForCausalLM" in message and "not supported" in message
    assert supported_architectures()  # the message lists every one of them
    for name in supported_architectures():
        assert name in message


@pytest.mark.parametrize("keep_weights", [False, True], ids=["empty-folder", "weights-only"])
def test_folder_without_config(qwen2_vl_ckpt, tmp_path, keep_weights):
    folder = tmp_path / "no-config"
    if keep_weights:
        shutil.copytree(qwen2_vl_ckpt, folder)
        (folder / "config.json").unlink()
    else:
        folder.mkdir()
    with pytest.raises(ValueError) as excinfo:
        _build(str(folder))
    message = str(excinfo.value)
    assert str(folder) in message and "config.json" in message


def test_missing_model_folder(tmp_path):
    missing = str(tmp_path / "not-there")
    with pytest.raises(ValueError) as excinfo:
        _build(missing)
    assert missing in str(excinfo.value)


@pytest.mark.parametrize(
    ("kwargs", "causes"),
    [
        ({"tensor_parallel_size": 2}, ("tensor_parallel_size=2", "tensor_parallel_size=1")),
        ({"pipeline_parallel_size": 2}, ("pipeline_parallel_size=2", "use 1")),
        (
            {"enable_lora": True, "max_loras": 2, "max_cpu_loras": 1},
            ("max_cpu_loras=1", "max_loras=2"),
        ),
        ({"enable_lora": True, "max_lora_rank": 0}, ("max_lora_rank must be >= 1",)),
        ({"limit_mm_per_prompt": {"video": 1}}, ("['video']", "'image'")),
        ({"dtype": "float8"}, ("dtype='float8'", "'bfloat16'")),
        ({"max_num_seqs": 0}, ("max_num_seqs must be >= 1",)),
        ({"gpu_memory_utilization": 1.5}, ("gpu_memory_utilization", "(0, 1]")),
        ({"mm_processor_kwargs": {"max_pixel": 1000}}, ("['max_pixel']", "max_pixels")),
        ({"image_max_pixels": 0}, ("image_max_pixels must be a positive integer, got 0",)),
        ({"image_max_pixels": 2.5}, ("image_max_pixels", "got 2.5", "VLMX_IMAGE_MAX_PIXELS")),
        ({"image_max_bytes": -1}, ("image_max_bytes must be a positive integer, got -1",)),
        ({"image_max_bytes": True}, ("image_max_bytes", "got True")),
        ({"image_fetch_timeout": "10"}, ("image_fetch_timeout", "number of seconds", "'10'")),
        ({"image_fetch_timeout": float("nan")}, ("image_fetch_timeout", "got nan")),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_unsupported_engine_args(qwen2_vl_ckpt, kwargs, causes):
    with pytest.raises(ValueError) as excinfo:
        _build(qwen2_vl_ckpt, **kwargs)
    for fragment in causes:
        assert fragment in str(excinfo.value), f"{fragment!r} not in {excinfo.value}"


def test_bad_image_limit_in_the_environment_is_named(qwen2_vl_ckpt, monkeypatch):
    monkeypatch.setenv("VLMX_IMAGE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match=r"VLMX_IMAGE_MAX_BYTES='lots' is not a valid int"):
        _build(qwen2_vl_ckpt)
    # a field that is set wins: the variable is not read for it
    config = EngineArgs(qwen2_vl_ckpt, image_max_bytes=1000).create_engine_config()
    assert config.model_config.media_limits.max_bytes == 1000


def test_unknown_engine_arg_names_the_accepted_ones(qwen2_vl_ckpt):
    with pytest.raises(TypeError) as excinfo:
        _build(qwen2_vl_ckpt, max_modle_len=512)
    message = str(excinfo.value)
    assert "max_modle_len" in message
    for name in (f.name for f in dataclasses.fields(EngineArgs)):
        assert repr(name) in message
