"""`vlmx run-batch --ray` on a local Ray cluster (2 CPU actors, the demo model): the mixed lines
of `test_run_batch` get the single-engine run's answers (greedy bodies equal per custom_id, the
same error lines), and a rerun after a kill (a half-written last line) completes the file to
exactly one line per input line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_run_batch import ENGINE_KWARGS, MIXED, _answers, _check_mixed, _write
from vlmx.engine.engine import LLMEngine
from vlmx.engine.engine_args import EngineArgs
from vlmx.entrypoints.openai.run_batch import BatchRunner
from vlmx.entrypoints.openai.run_batch_ray import (
    PENDING_SUFFIX,
    RayBatchOptions,
    processor_config,
    run_batch_ray,
)

# NOTE: float32 on CPU in the actors too, so that greedy answers match the single engine's.
ACTOR_KWARGS = {k: v for k, v in ENGINE_KWARGS.items() if k not in ("model", "device")}


@pytest.fixture(scope="module")
def demo_path() -> str:
    """The demo checkpoint, built once here so that the actors only read it."""
    from vlmx.demo.checkpoint import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="module")
def clean(demo_path, tmp_path_factory) -> tuple[Path, Path]:
    """The input file and the single-engine run's output of it."""
    folder = tmp_path_factory.mktemp("clean")
    _write(folder / "in.jsonl", MIXED)
    engine = LLMEngine(EngineArgs(**{**ENGINE_KWARGS, "model": demo_path}).create_engine_config())
    BatchRunner(engine, "demo").run(str(folder / "in.jsonl"), str(folder / "out.jsonl"), False)
    return folder / "in.jsonl", folder / "out.jsonl"


def test_ray_run_equals_the_single_engine_run(ray_cluster, demo_path, clean, tmp_path):
    in_path, clean_out = clean
    options = RayBatchOptions(
        concurrency=2, num_gpus_per_engine=0, num_cpus_per_engine=0.5, batch_size=3
    )
    config = processor_config(demo_path, {**ACTOR_KWARGS, "device": "cpu"}, options)
    out = tmp_path / "out.jsonl"
    summary = run_batch_ray(str(in_path), str(out), config, "demo", progress=False)
    _check_mixed(out)
    assert _answers(out) == _answers(clean_out)
    assert (summary.num_ok, summary.num_errors, summary.num_skipped) == (4, 8, 0)
    assert summary.num_images == 2
    assert not Path(str(out) + PENDING_SUFFIX).exists()


def test_the_cli_resumes_a_killed_ray_run(ray_cluster, demo_path, clean, tmp_path, capsys):
    from vlmx.cli import main

    in_path, clean_out = clean
    whole = clean_out.read_text().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    num_kept = 6
    out.write_text("".join(whole[:num_kept]) + whole[num_kept][:20])  # killed mid-line
    argv = ["run-batch", "-i", str(in_path), "-o", str(out), "--model", demo_path, "--ray"]
    argv += ["--concurrency", "2", "--num-gpus-per-engine", "0", "--num-cpus-per-engine", "0.5"]
    argv += ["--batch-size", "2", "--device", "cpu", "--dtype", ACTOR_KWARGS["dtype"]]
    argv += ["--max-model-len", str(ACTOR_KWARGS["max_model_len"])]
    argv += ["--max-num-seqs", str(ACTOR_KWARGS["max_num_seqs"])]
    argv += ["--limit-mm-per-prompt", json.dumps(ACTOR_KWARGS["limit_mm_per_prompt"])]
    argv += ["--served-model-name", "demo"]
    assert main(argv) == 0
    answered = len(MIXED) - num_kept
    assert f"{answered} lines answered" in capsys.readouterr().err
    assert out.read_text().startswith("".join(whole[:num_kept]))  # kept as they were
    _check_mixed(out)
    assert _answers(out) == _answers(clean_out)
    assert main(argv) == 0  # a rerun finds everything done
    assert f"0 lines answered (0 ok, 0 errors), {len(MIXED)} already done" in (
        capsys.readouterr().err
    )


def test_window_is_refused_with_ray(capsys):
    from vlmx.cli import main

    argv = ["run-batch", "-i", "in.jsonl", "-o", "out.jsonl", "--ray", "--window", "4"]
    assert main(argv) == 2
    assert "with --ray use --batch-size" in capsys.readouterr().err


def test_ray_missing_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    from vlmx.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    argv = ["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]
    assert main([*argv, "--ray"]) == 2
    assert 'pip install "vlmx[ray]"' in capsys.readouterr().err


def test_a_chat_template_file_is_read_by_the_driver(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    config = processor_config("demo", {}, RayBatchOptions(), str(tmp_path / "t.jinja"))
    assert config.chat_template == template
    with pytest.raises(ValueError, match="no such file"):
        processor_config("demo", {}, RayBatchOptions(), str(tmp_path / "missing.jinja"))
