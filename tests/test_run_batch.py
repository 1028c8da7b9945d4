"""`vlmx run-batch`: mixed good and bad lines, resuming after a kill (a half-written last line,
a partial output) to exactly the clean run's lines, the bounded read window, the CLI."""

from __future__ import annotations

import base64
import io
import json
import os
from collections import Counter

import pytest

from vlmx.demo.images import structured_image
from vlmx.engine.engine import LLMEngine
from vlmx.engine.engine_args import EngineArgs
from vlmx.entrypoints.openai.run_batch import BatchRunner, read_done

ENGINE_KWARGS = dict(
    model="demo",
    max_model_len=1024,
    max_num_seqs=8,
    limit_mm_per_prompt={"image": 2},
    # NOTE: VLMX_TEST_DEVICE=cuda runs these on a GPU; keep float32 there, so that greedy answers
    # are equal across batch shapes (bfloat16 near-ties of the random demo model flip).
    device=os.environ.get("VLMX_TEST_DEVICE", "cpu"),
    dtype=os.environ.get("VLMX_TEST_DTYPE", "float32"),
)


def _data_url(width: int, height: int, variant: int) -> str:
    buf = io.BytesIO()
    structured_image(width, height, variant).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(text: str, images: tuple[str, ...] = (), **body) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content.append({"type": "text", "text": text})
    messages = [{"role": "user", "content": content}]
    return {"model": "demo", "messages": messages, "max_tokens": 6, "temperature": 0, **body}


def _line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


IMAGE_A, IMAGE_B = _data_url(64, 96, 0), _data_url(96, 64, 1)
MIXED = [
    _line("two-images", _chat("Compare them.", (IMAGE_A, IMAGE_B))),
    _line(
        "completion",
        {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0},
        "/v1/completions",
    ),
    "{not json",
    json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": _chat("x")}),
    _line("wrong-url", _chat("x"), "/v1/embeddings"),
    _line("wrong-type", _chat("x", max_tokens="six")),
    _line("bad-temperature", _chat("x", temperature=-1)),
    _line("three-images", _chat("x", (IMAGE_A, IMAGE_B, IMAGE_A))),
    _line("bad-image", _chat("x", ("data:image/png;base64,AAAA",))),
    _line("two-images", _chat("A duplicate id.")),
    _line("n2", _chat("Two answers.", n=2, temperature=1.0, top_p=1.0, top_k=0, seed=5)),
    _line("text", _chat("Only text.", max_tokens=8)),
]
# custom_id (or line number, for lines without one) -> status code, or the error code
EXPECTED = {
    "two-images": 200,
    "completion": 200,
    3: "invalid_json",
    4: "invalid_line",
    "wrong-url": "invalid_url",
    "wrong-type": "invalid_body",
    "bad-temperature": 400,
    "three-images": 400,
    "bad-image": 400,
    "two-images#dup": "duplicate_custom_id",
    "n2": 200,
    "text": 200,
}


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineArgs(**ENGINE_KWARGS).create_engine_config())


def _write(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _answers(path) -> list[tuple]:
    """Output lines without their random ids, sorted: comparable across runs."""
    out = []
    for raw in path.read_text().splitlines():
        line = json.loads(raw)
        response, error = line["response"], line["error"]
        body = None
        if response is not None:
            body = dict(response["body"])
            body.pop("id", None)
            body.pop("created", None)
        key = line["custom_id"] or error["line"]
        out.append((str(key), json.dumps(body, sort_keys=True), json.dumps(error, sort_keys=True)))
    return sorted(out)


def _check_mixed(path) -> None:
    lines = [json.loads(raw) for raw in path.read_text().splitlines()]
    assert len(lines) == len(MIXED)
    got = {}
    for line in lines:
        key = line["custom_id"] or line["error"]["line"]
        if line["error"] is not None and line["error"]["code"] == "duplicate_custom_id":
            key = f"{key}#dup"
            assert "duplicate" in line["error"]["message"]
        assert key not in got, key
        got[key] = line["response"]["status_code"] if line["response"] else line["error"]["code"]
        if line["response"] and line["response"]["status_code"] == 400:
            assert set(line["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    assert got == EXPECTED
    by_id = {line["custom_id"]: line for line in lines if line["error"] is None}
    chat = by_id["two-images"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 6
    text_only = by_id["text"]["response"]["body"]["usage"]["prompt_tokens"]
    assert chat["usage"]["prompt_tokens"] >= text_only + 2 * 4  # each image is 4+ tokens
    assert by_id["completion"]["response"]["body"]["object"] == "text_completion"
    assert [c["index"] for c in by_id["n2"]["response"]["body"]["choices"]] == [0, 1]


def test_mixed_lines_each_get_one_answer(engine, tmp_path):
    _write(tmp_path / "in.jsonl", MIXED)
    summary = BatchRunner(engine, "demo").run(
        str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), progress=False
    )
    _check_mixed(tmp_path / "out.jsonl")
    assert (summary.num_ok, summary.num_errors, summary.num_skipped) == (4, 8, 0)
    assert summary.num_images == 2
    assert "12 lines answered (4 ok, 8 errors)" in summary.describe()


def test_resume_after_a_kill_gives_the_clean_run(engine, tmp_path):
    _write(tmp_path / "in.jsonl", MIXED)
    clean = tmp_path / "clean.jsonl"
    runner = BatchRunner(engine, "demo")
    runner.run(str(tmp_path / "in.jsonl"), str(clean), progress=False)
    whole = clean.read_text().splitlines(keepends=True)
    for num_kept, cut_mid_line in ((5, True), (8, False), (0, True)):
        out = tmp_path / f"out-{num_kept}-{cut_mid_line}.jsonl"
        partial = "".join(whole[:num_kept])
        if cut_mid_line:
            partial += whole[num_kept][: len(whole[num_kept]) // 2]
        out.write_text(partial)
        summary = runner.run(str(tmp_path / "in.jsonl"), str(out), progress=False)
        assert summary.num_skipped == num_kept
        assert summary.num_ok + summary.num_errors == len(MIXED) - num_kept
        assert out.read_text().startswith("".join(whole[:num_kept]))  # kept as they were
        _check_mixed(out)
        assert _answers(out) == _answers(clean)
    assert read_done(str(clean)).num_lines == len(MIXED)


def test_a_large_input_streams_through_a_bounded_window(engine, tmp_path):
    lines = [
        _line(
            f"c{i}", {"prompt": f"Line {i}:", "max_tokens": 1, "temperature": 0}, "/v1/completions"
        )
        for i in range(120)
    ]
    _write(tmp_path / "in.jsonl", lines)
    runner = BatchRunner(engine, "demo", window=8)
    summary = runner.run(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), progress=False)
    out = [json.loads(raw) for raw in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert Counter(line["custom_id"] for line in out) == Counter(f"c{i}" for i in range(120))
    assert all(line["response"]["status_code"] == 200 for line in out)
    assert summary.num_ok == 120
    assert 1 < summary.max_lines_in_flight <= 8  # read as the engine had room, never all


def test_the_cli(tmp_path, capsys):
    from vlmx.cli import main

    _write(tmp_path / "in.jsonl", [MIXED[1], MIXED[2]])
    out = tmp_path / "out.jsonl"
    argv = ["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(out), "--model", "demo"]
    argv += ["--device", ENGINE_KWARGS["device"], "--dtype", ENGINE_KWARGS["dtype"]]
    argv += ["--max-model-len", "512", "--max-num-seqs", "4"]
    assert main(argv) == 0
    assert "2 lines answered (1 ok, 1 errors)" in capsys.readouterr().err
    assert main(argv) == 0  # a rerun finds everything done
    assert "0 lines answered (0 ok, 0 errors), 2 already done" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 2
