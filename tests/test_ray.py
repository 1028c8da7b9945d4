"""`vlmx.ray`: rows -> requests without Ray, then the processor on a local Ray cluster (2 CPU
actors, the demo's tiny untied Qwen2.5-VL): results equal `LLM.chat` on the same rows, bad rows
carry their error while the rest run, JSONL and Parquet of image bytes in, results out."""

from __future__ import annotations

import base64
import io
import json
import sys

import pytest

from vlmx import LLM, SamplingParams
from vlmx.ray import RESULT_COLUMNS, build_llm_processor, vlmxEngineProcessorConfig
from vlmx.ray.rows import row_request

ENGINE_KWARGS = {
    "device": "cpu",
    "dtype": "float32",
    "max_model_len": 2048,
    "limit_mm_per_prompt": {"image": 2},
    "max_num_seqs": 8,
}
GREEDY = {"temperature": 0.0, "max_tokens": 6}


def _config(**kwargs) -> vlmxEngineProcessorConfig:
    return vlmxEngineProcessorConfig(**{"model_source": "demo", **kwargs})


# ---------------------------------------------------------------------------------------------
# Rows -> requests (no Ray)


def test_prompt_and_image_columns_become_one_user_message():
    config = _config(image_columns=("first", "more"), sampling_params={"max_tokens": 3})
    row = {"prompt": "Compare.", "first": {"bytes": b"png", "path": None}, "more": ["b.png", None]}
    request = row_request(row, config, {"temperature": 0.7})
    assert request.prompt is None
    content = request.conversation[0]["content"]
    assert [p.get("image") for p in content[:3]] == [b"png", "b.png", None]
    assert content[3] == {"type": "text", "text": "Compare."}
    assert request.sampling_params.max_tokens == 3
    assert request.sampling_params.temperature == 1.0  # given params: no checkpoint defaults


def test_raw_prompt_goes_to_generate_with_its_images():
    config = _config(apply_chat_template=False)
    request = row_request({"prompt": "<image> hi", "image": "a.png"}, config, {})
    assert request.conversation is None
    assert request.prompt == {"prompt": "<image> hi", "multi_modal_data": {"image": ["a.png"]}}
    with pytest.raises(ValueError, match="apply_chat_template=True"):
        row_request({"messages": [{"role": "user", "content": "x"}]}, config, {})


def test_arrow_nulls_are_dropped_and_row_params_override_the_config():
    config = _config(sampling_params={"max_tokens": 5, "temperature": 0.0})
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi", "image_url": None},
                {"type": "image_url", "image_url": {"url": "a.png"}, "text": None},
            ],
        }
    ]
    row = {"messages": messages, "sampling_params": {"max_tokens": 2, "seed": None}}
    request = row_request(row, config, {"temperature": 0.7})
    assert request.conversation[0]["content"] == [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": "a.png"}},
    ]
    assert (request.sampling_params.max_tokens, request.sampling_params.temperature) == (2, 0.0)
    defaulted = row_request({"messages": messages}, _config(), {"temperature": 0.7})
    assert defaulted.sampling_params.temperature == 0.7  # no params anywhere: the checkpoint's


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"id": 1}, "neither 'messages' nor 'prompt'"),
        ({"prompt": 3}, "must be a string"),
        ({"prompt": "x", "sampling_params": {"n": 2}}, "one completion per row"),
        ({"prompt": "x", "sampling_params": {"nucleus": 0.5}}, "nucleus"),
        ({"prompt": "x", "sampling_params": {"temperature": -1.0}}, "temperature"),
        ({"prompt": "x", "image": {"url": "a.png"}}, "needs 'bytes' or 'path'"),
    ],
)
def test_bad_rows_raise_value_error(row, match):
    with pytest.raises(ValueError, match=match):
        row_request(row, _config(), {})


def test_config_checks_its_values():
    with pytest.raises(ValueError, match="concurrency"):
        _config(concurrency=0)
    with pytest.raises(ValueError, match="concurrency"):
        _config(concurrency=(3, 2))
    with pytest.raises(ValueError, match="model_source"):
        _config(engine_kwargs={"model": "x"})
    with pytest.raises(ValueError, match="max_num_seq"):
        _config(engine_kwargs={"max_num_seq": 4})
    with pytest.raises(ValueError, match="sampling_params"):
        _config(sampling_params={"nucleus": 0.5})
    assert _config(concurrency=[1, 3]).min_max_concurrency == (1, 3)


def test_the_capwords_name_is_the_same_class():
    from vlmx.ray import VlmxEngineProcessorConfig

    assert VlmxEngineProcessorConfig is vlmxEngineProcessorConfig
    assert VlmxEngineProcessorConfig(model_source="demo", batch_size=2).batch_size == 2


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "vlmx\[ray\]"'):
        build_llm_processor(_config())


# ---------------------------------------------------------------------------------------------
# On a local Ray cluster


@pytest.fixture(scope="module")
def demo_path() -> str:
    """The demo checkpoint, built once here so that the actors only read it."""
    from vlmx.demo.checkpoint import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="module")
def reference_llm(demo_path) -> LLM:
    return LLM(demo_path, **ENGINE_KWARGS)


@pytest.fixture(scope="module")
def png_bytes(test_images) -> list[bytes]:
    encoded = []
    for image in test_images[:4]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def _processor(demo_path: str, **kwargs):
    config = vlmxEngineProcessorConfig(
        model_source=demo_path,
        engine_kwargs=ENGINE_KWARGS,
        concurrency=2,
        batch_size=3,
        num_gpus=0,
        num_cpus=0.5,  # NOTE: leaves a CPU of the two for Ray Data's read and write tasks
        sampling_params=GREEDY,
        **kwargs,
    )
    return build_llm_processor(config)


def _expected(llm: LLM, conversations: list[list[dict]]) -> list[tuple]:
    outputs = llm.chat(conversations, SamplingParams(**GREEDY), use_tqdm=False)
    return [
        (o.outputs[0].text, len(o.prompt_token_ids), len(o.outputs[0].token_ids)) for o in outputs
    ]


def _got(row: dict) -> tuple:
    return row["generated_text"], row["num_input_tokens"], row["num_generated_tokens"]


def test_jsonl_in_results_out_with_bad_rows(
    ray_cluster, demo_path, reference_llm, test_images, png_bytes, tmp_path
):
    paths = []
    for i, image in enumerate(test_images[:3]):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes[3]).decode()

    def conversation(urls: list[str], text: str) -> list[dict]:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]

    good = {
        0: conversation([paths[0], paths[1]], "What differs?"),
        1: conversation([data_url], "Describe it."),
        3: conversation([paths[2]], "What is this?"),
        5: conversation([paths[1], data_url], "Which is larger?"),
        6: conversation([paths[0]], "Colours?"),
    }
    bad = {
        2: (conversation([str(tmp_path / "missing.png")], "?"), "missing.png"),
        4: (conversation(paths, "Too many?"), "limit_mm_per_prompt"),
        7: (conversation([], "long " * 3000), "max_model_len"),
    }
    rows = [{"id": i, "messages": good[i] if i in good else bad[i][0]} for i in range(8)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))

    dataset = ray_cluster.data.read_json(str(source), override_num_blocks=2)
    _processor(demo_path)(dataset).write_json(str(tmp_path / "out"))
    files = sorted((tmp_path / "out").iterdir())
    results = {r["id"]: r for f in files for r in map(json.loads, f.read_text().splitlines()) if r}

    assert sorted(results) == list(range(8))
    expected = dict(zip(good, _expected(reference_llm, list(good.values()))))
    for i, want in expected.items():
        assert results[i]["error"] is None, results[i]["error"]
        assert _got(results[i]) == want
        assert results[i]["finish_reason"] == "length"
        assert (
            results[i]["messages"][0]["content"][-1]["text"] == good[i][0]["content"][-1]["text"]
        )  # the input columns are kept
    assert len({want[0] for want in expected.values()}) > 1  # the rows' answers differ
    for i, (_, match) in bad.items():
        assert match in results[i]["error"]
        assert results[i]["generated_text"] is None and results[i]["num_input_tokens"] is None
    assert set(RESULT_COLUMNS) <= set(results[0])


def test_parquet_of_image_bytes_in_results_out(
    ray_cluster, demo_path, reference_llm, test_images, png_bytes, tmp_path
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        ("Describe both.", [png_bytes[0], png_bytes[1]]),
        ("What is it?", [png_bytes[2]]),
        ("And this?", [b"this is not an image" * 4]),
        ("No image here.", []),
        ("Which is wider?", [png_bytes[3], png_bytes[0]]),
    ]
    table = pa.table(
        {
            "id": list(range(len(rows))),
            "prompt": [prompt for prompt, _ in rows],
            "images": pa.array([images for _, images in rows], type=pa.list_(pa.binary())),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")

    dataset = ray_cluster.data.read_parquet(str(tmp_path / "in.parquet"), override_num_blocks=2)
    processor = _processor(demo_path, prompt_column="prompt", image_columns=("images",))
    processor(dataset).write_parquet(str(tmp_path / "out"))
    results = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}

    assert sorted(results) == list(range(len(rows)))
    by_bytes = dict(zip(png_bytes, test_images))
    good = [0, 1, 3, 4]
    conversations = []
    for i in good:
        prompt, images = rows[i]
        parts = [{"type": "image_pil", "image_pil": by_bytes[b]} for b in images]
        conversations.append(
            [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
        )
    for i, want in zip(good, _expected(reference_llm, conversations)):
        assert results[i]["error"] is None, results[i]["error"]
        assert _got(results[i]) == want
        assert results[i]["images"] == rows[i][1]  # the input columns are kept
    assert "could not be identified as an image" in results[2]["error"]
    assert results[2]["generated_text"] is None
