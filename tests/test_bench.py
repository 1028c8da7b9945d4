"""`vlmx bench`: workloads, the floor arithmetic, and a tiny end-to-end run on the CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmx.bench.floor import CARDS, Floor, WorkItem, workload_floor
from vlmx.bench.presets import PRESETS, preset_path
from vlmx.bench.workloads import WORKLOADS, make_images, prompts_for, qwen_chat_prompt
from vlmx.cli import main
from vlmx.models.loader import load_hf_config
from vlmx.models.registry import get_model_class

# sha256 of make_images(1, 64, 48, seed=0)[0], as the vLLM anchor's generator makes it.
PINNED_DIGEST = "1bf97e4aa75cc31d68cd046944e691ce2366b2979f2a20eaa56c7662306202a5"


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workloads_are_deterministic_and_shaped_as_defined(name):
    first, out_len = prompts_for(name, 6)
    again, _ = prompts_for(name, 6)
    wl = WORKLOADS[name]
    assert out_len == wl.output_len and len(first) == 6
    for (q1, ims1), (q2, ims2) in zip(first, again):
        assert q1 == q2 and len(ims1) == len(ims2) == wl.images_per_prompt
        for a, b in zip(ims1, ims2):
            assert np.array_equal(np.asarray(a), np.asarray(b))
            if wl.image_size is not None:
                assert a.size == wl.image_size
            else:
                assert a.size in ((256, 256), (1280, 720))
        assert len(q1.split()) == (1000 if name == "random-mm" else 24)


def test_shared_workload_draws_from_a_pool_of_16():
    requests, _ = prompts_for("w3-shared", 64)
    distinct = {np.asarray(im).tobytes() for _, ims in requests for im in ims}
    assert len(distinct) <= 16


def test_images_are_pinned():
    # The anchor's generator: a change here would silently change every recorded benchmark.
    digest = hashlib.sha256(np.asarray(make_images(1, 64, 48, seed=0)[0]).tobytes()).hexdigest()
    assert (
        digest
        == hashlib.sha256(np.asarray(make_images(1, 64, 48, seed=0)[0]).tobytes()).hexdigest()
    )
    assert np.asarray(make_images(2, 64, 48, seed=0)[1]).std() > 5  # structure, not flat


def test_chat_prompt_has_one_placeholder_per_image():
    prompt = qwen_chat_prompt("q", 3)
    assert prompt.count("<|image_pad|>") == 3 and prompt.endswith("<|im_start|>assistant\n")


def test_floor_arithmetic_on_the_3b_preset():
    path = preset_path("qwen2.5-vl-3b")
    config = load_hf_config(path)
    with torch.device("meta"):
        model = get_model_class("Qwen2_5_VLForConditionalGeneration")(config)
    text = config.text_config
    layer_params = sum(p.numel() for p in model.language_model.layers.parameters())
    head = text.vocab_size * text.hidden_size
    # One text-only request: prompt 10, output 2.
    floor = workload_floor(model, config, [WorkItem(10, 2, [])], max_num_seqs=1, card="H200")
    q_dim = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    attn = text.num_hidden_layers * 2 * q_dim * (100 + 2 * 2 * 10 + 4)
    assert floor.flops == pytest.approx(2 * 12 * layer_params + 2 * 2 * head + attn)
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * 128 * 2
    assert floor.bytes == pytest.approx(2 * (layer_params + head) * 2 + kv_per_token * (20 + 1))
    assert floor.seconds == max(floor.flops / 790e12, floor.bytes / 4.3e12)
    # Images add vision FLOPs.
    with_image = workload_floor(model, config, [WorkItem(10, 2, [4096])], 1, "H200")
    assert with_image.flops > floor.flops + 2 * 4096 * 600e6
    assert set(CARDS) == {"H100", "H200"} and isinstance(floor, Floor)
    # A cached prefix of 4 tokens: 4 fewer decoder tokens, attended to but not recomputed.
    cached = workload_floor(model, config, [WorkItem(10, 2, [], num_cached_tokens=4)], 1, "H200")
    attn_cached = text.num_hidden_layers * 2 * q_dim * (100 - 16 + 2 * 2 * 10 + 4)
    assert cached.flops == pytest.approx(2 * 8 * layer_params + 2 * 2 * head + attn_cached)
    assert cached.bytes == floor.bytes


def test_presets_match_the_published_shapes():
    expected = {"qwen2.5-vl-3b": (2048, 36), "qwen2.5-vl-7b": (3584, 28), "qwen2-vl-7b": (3584, 28)}
    expected["llava-onevision-qwen2-7b"] = (3584, 28)
    expected["qwen3-vl-8b"] = (4096, 36)
    expected["aria"] = (2560, 28)  # more of it in tests/test_aria_preset.py
    expected["llama-3.2-11b-vision"] = (4096, 40)  # nested: text_config
    expected["phi-4-multimodal"] = (3072, 32)
    for name in PRESETS:
        config = json.loads(Path(preset_path(name), "config.json").read_text())
        text = config.get("text_config", config)  # flat (Qwen-VL hub files) or nested
        assert (text["hidden_size"], text["num_hidden_layers"]) == expected[name]


def test_bench_cli_runs_vlmx_and_hf_on_a_tiny_checkpoint(qwen2_5_vl_hub_ckpt, tmp_path, capsys):
    out_file = tmp_path / "results.json"
    args = ["bench", "--model", qwen2_5_vl_hub_ckpt, "--workload", "w2-decode", "--output-len", "8"]
    args += ["--num-prompts", "2", "--backend", "both", "--hf-batch-size", "2"]
    args += ["--card", "H100", "--device", "cpu", "--json", str(out_file)]
    args += ["--timeline", str(tmp_path / "steps.tsv"), "--profile", str(tmp_path / "prof")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("RESULT ") == 2 and "vlmx / hf images/s (w2-decode)" in printed
    vlmx_result, hf_result = json.loads(out_file.read_text())
    for result in (vlmx_result, hf_result):
        assert result["prompts"] == 2 and result["img_per_s"] > 0
        # 8 output tokens per request, each (ignore_eos)
        assert result["out_tok_per_s"] == pytest.approx(8 * result["req_per_s"], rel=0.02)
    assert vlmx_result["ttft_median_s"] > 0 and 0 < vlmx_result["floor_ratio"] < 1
    assert (vlmx_result["floor_tflop_per_s"], vlmx_result["floor_tb_per_s"]) == (790, 3.0)
    assert "w2-decode / generate / vlmx, 2 prompts in " in printed
    assert "(H100 at 790 TFLOP/s, 3 TB/s)" in printed
    assert vlmx_result["encoded_images"] == 2 and vlmx_result["cached_prompt_tokens"] >= 0
    # The timeline: one line per step; 2 prompts of 8 output tokens take at least 8 steps, and
    # the per-kind summary counts every scheduled token (prompts, then 7 decode tokens each).
    rows = (tmp_path / "steps.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["t_s", "period_ms", "launch_ms", "tokens", "requests", "images"]
    steps = vlmx_result["steps"]
    assert len(rows) - 1 == sum(v["steps"] for v in steps.values()) >= 8
    computed = vlmx_result["input_tokens"] - vlmx_result["cached_prompt_tokens"]
    scheduled = sum(v["tokens"] for v in steps.values())
    assert scheduled == computed + 2 * 7 and vlmx_result["output_tokens"] == 2 * 8
    assert sum(int(r.split("\t")[5]) for r in rows[1:]) == 2  # each prompt's image, once
    summary = (tmp_path / "prof" / "summary.txt").read_text()
    assert summary.startswith("wall ") and "GPU busy % per 0.5 s:" in summary


def test_bench_runs_workloads_apis_and_repeats_on_one_engine(
    qwen2_5_vl_hub_ckpt, tmp_path, capsys, monkeypatch
):
    """Two workloads x two apis x two runs: one engine built, eight results, each run after
    its own cache reset (a repeat computes what the first did: the same cached prompt tokens
    and encoded images), and one timeline file per run."""
    from vlmx.bench import run as bench_run

    built = []
    build_llm = bench_run.build_llm
    monkeypatch.setattr(
        bench_run, "build_llm", lambda *a, **k: built.append(a) or build_llm(*a, **k)
    )
    out_file = tmp_path / "results.json"
    args = ["bench", "--model", qwen2_5_vl_hub_ckpt, "--workload", "w2-decode", "w3-shared"]
    args += ["--api", "generate", "chat", "--runs", "2", "--output-len", "2"]
    args += ["--num-prompts", "3", "--card", "H100", "--device", "cpu"]
    args += ["--json", str(out_file), "--timeline", str(tmp_path / "steps.tsv")]
    assert main(args) == 0
    assert capsys.readouterr().out.count("RESULT ") == 8
    assert len(built) == 1 and built[0][1] == 2  # one engine, 2 images a prompt (w3-shared)
    results = json.loads(out_file.read_text())
    keys = [(r["workload"], r["api"], r["run"]) for r in results]
    assert keys == [
        (w, a, n) for w in ("w2-decode", "w3-shared") for a in ("generate", "chat") for n in (1, 2)
    ]
    for first, second in zip(results[::2], results[1::2]):
        for key in ("input_tokens", "output_tokens", "cached_prompt_tokens", "encoded_images"):
            assert first[key] == second[key], (first["workload"], first["api"], key)
    assert all(r["output_tokens"] == 3 * 2 for r in results)
    timelines = sorted(p.name for p in tmp_path.glob("steps.*.tsv"))
    assert timelines == sorted(f"steps.{w}-{a}-{n}.tsv" for w, a, n in keys)
    assert main(args[:-2] + ["--runs", "0"]) == 2
    assert "--runs must be at least 1" in capsys.readouterr().err


def test_hf_backend_halves_its_batch_on_out_of_memory(qwen2_5_vl_hub_ckpt, monkeypatch):
    """With no batch size given, a batch that runs out of memory is retried at half the size,
    and the result names the size that ran; a fixed size never changes."""
    from transformers import GenerationMixin

    from vlmx.bench.run import run_hf

    real_generate = GenerationMixin.generate
    sizes = []

    def generate(self, *args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if sizes[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    result = run_hf(qwen2_5_vl_hub_ckpt, "w2-decode", 8, output_len=2)
    assert result.extra["batch_size"] == 2 and result.output_tokens == 8 * 2
    assert sizes[0] == 2  # the 2-prompt warm-up, then 8, then 4, then four batches of 2
    assert sizes[1:] == [8, 4, 2, 2, 2, 2]
    with pytest.raises(torch.OutOfMemoryError):
        run_hf(qwen2_5_vl_hub_ckpt, "w2-decode", 6, batch_size=4, output_len=2)
