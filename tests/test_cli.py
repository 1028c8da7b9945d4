"""The `vlmx` command line, run in-process through `vlmx.cli.main`, and once as installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlmx import cli

QUESTION = "What differs between the two images?"


def _main(argv: list[str]) -> int:
    """`cli.main`'s exit status, whether it returns it or exits with it (argparse)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory, test_images) -> list[str]:
    folder = tmp_path_factory.mktemp("cli-images")
    paths = []
    for name, image in zip(("a.png", "b.png"), test_images[:2]):
        image.save(folder / name)
        paths.append(str(folder / name))
    return paths


def test_demo(capsys):
    assert _main(["generate", "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()  # the answer
    assert "noise" in err and "random weights" in err
    timing = [line for line in err.splitlines() if "tok/s" in line]
    assert len(timing) == 1
    assert "2 images" in timing[0] and "4 output tokens" in timing[0]
    assert "model load" in timing[0]


@pytest.fixture(scope="module")
def untied_ckpt() -> str:
    """The demo's tiny Qwen2.5-VL by its path. Its lm_head is untied, so greedy answers are
    visible text (a tied random head repeats the prompt's last token, a newline)."""
    from vlmx.demo.checkpoint import demo_model_path

    return demo_model_path()


def test_generate_and_chat_print_the_same_answer(untied_ckpt, image_paths, capsys):
    common = ["--model", untied_ckpt, "--max-tokens", "6", "--temperature", "0"]
    common += ["--device", "cpu", "--dtype", "float32"]
    for path in image_paths:
        common += ["--image", path]
    answers = []
    for method in ("generate", "chat"):
        assert _main(["generate", *common, "--method", method, QUESTION]) == 0
        out, err = capsys.readouterr()
        assert out.strip()
        assert "noise" not in err  # only the demo says so
        assert "2 images" in err and "6 output tokens" in err
        answers.append(out)
    assert answers[0] == answers[1]


@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_unreadable_image_exits_2(qwen2_vl_ckpt, image_paths, tmp_path, capsys, kind):
    bad = tmp_path / "photo.png"
    if kind == "garbage":
        bad.write_bytes(b"this is not an image at all" * 10)
    argv = ["generate", "--model", qwen2_vl_ckpt, "--device", "cpu", "--dtype", "float32"]
    argv += ["--image", image_paths[0], "--image", str(bad), "--max-tokens", "2", QUESTION]
    assert _main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("vlmx: error:")
    assert str(bad) in err
    assert ("does not exist" if kind == "missing" else "could not be identified as an image") in err
    assert "Traceback" not in err
    # One prompt, one line: no batch summary pointing at a Python attribute.
    assert ".outputs" not in err


def test_bad_sampling_option_exits_2(qwen2_vl_ckpt, capsys):
    argv = ["generate", "--model", qwen2_vl_ckpt, "--device", "cpu", "--max-tokens", "0", "Hi"]
    assert _main(argv) == 2
    _, err = capsys.readouterr()
    assert err.startswith("vlmx: error:") and "max_tokens" in err


def test_installed_script_help():
    script = Path(sys.executable).parent / "vlmx"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vlmx.cli"]
    result = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: vlmx")
    assert "generate" in result.stdout


def test_version(capsys):
    import vlmx

    assert _main(["--version"]) == 0
    assert capsys.readouterr().out == f"vlmx {vlmx.__version__}\n"


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without a usable CUDA GPU, whatever this one has."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(no_gpu, capsys, device):
    argv = ["generate", "--model", "org/any-model", "--device", device, "Hi"]
    assert _main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"vlmx: error: device={device!r} asks for a CUDA GPU")
    assert err.count("\n") == 1 and "device 'cpu'" in err


def test_llm_on_cuda_without_a_gpu_raises_value_error(no_gpu):
    from vlmx import LLM

    with pytest.raises(ValueError, match=r"device='cuda' asks for a CUDA GPU.*use device 'cpu'"):
        LLM(model="demo", device="cuda")


def test_cuda_index_past_the_gpus(monkeypatch):
    import torch

    from vlmx.config import parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"has 2 CUDA GPU\(s\): use cuda:0 to cuda:1"):
        parse_device("cuda:2")


@pytest.mark.parametrize("model", ["/does/not/exist", "./not-here", "../not-here", "~/not-here"])
def test_missing_model_folder_says_so(capsys, model):
    assert _main(["generate", "--model", model, "--device", "cpu", "Hi"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"vlmx: error: model folder {model!r}")
    assert "does not exist" in err and "hub" not in err.split(";")[0]
    assert "Validation" not in err and err.count("\n") == 1


def test_home_folder_model_path_is_expanded(untied_ckpt, monkeypatch):
    from vlmx.engine.engine_args import EngineArgs

    home, name = Path(untied_ckpt).parent, Path(untied_ckpt).name
    monkeypatch.setenv("HOME", str(home))
    config = EngineArgs(model=f"~/{name}", device="cpu").create_engine_config()
    assert config.model_config.model_path == untied_ckpt


def _prompt_tokens(err: str) -> int:
    timing = next(line for line in err.splitlines() if "prompt tokens" in line)
    return int(timing.split(" prompt tokens")[0].split()[-1])


def test_mm_processor_kwargs_and_limit_mm_per_prompt(untied_ckpt, image_paths, capsys):
    argv = ["generate", "--model", untied_ckpt, "--device", "cpu", "--max-tokens", "1"]
    argv += ["--image", image_paths[0]]  # 224x224: 8x8 merged patches of 28 pixels
    assert _main([*argv, "Hi"]) == 0
    full = _prompt_tokens(capsys.readouterr().err)
    small = '{"max_pixels": 12544}'  # 112x112: 4x4 merged patches
    assert _main([*argv, "--mm-processor-kwargs", small, "Hi"]) == 0
    assert full - _prompt_tokens(capsys.readouterr().err) == 64 - 16

    two = [*argv, "--image", image_paths[1], "--limit-mm-per-prompt", '{"image": 1}', "Hi"]
    assert _main(two) == 2
    _, err = capsys.readouterr()
    assert err.startswith("vlmx: error: prompt has 2 images but limit_mm_per_prompt")


@pytest.mark.parametrize(
    ("flag", "value", "cause"),
    [
        ("--limit-mm-per-prompt", '{"image": 2', "is not valid JSON"),
        ("--limit-mm-per-prompt", "2", "got a JSON int"),
        ("--mm-processor-kwargs", "[1]", "got a JSON list"),
    ],
)
def test_bad_json_options_exit_2(capsys, flag, value, cause):
    assert _main(["generate", flag, value]) == 2
    _, err = capsys.readouterr()
    assert f"argument {flag}: takes a JSON object" in err and cause in err
    assert "Traceback" not in err


def test_bad_limit_value_is_a_value_error():
    from vlmx.engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match=r"limit_mm_per_prompt\['image'\] must be a number"):
        EngineArgs(
            model="demo", device="cpu", limit_mm_per_prompt={"image": "2"}
        ).create_engine_config()


def test_demo_model_in_python():
    from vlmx import LLM, SamplingParams

    llm = LLM(model="demo", device="cpu")
    outputs = llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 2
    assert llm.llm_engine.config.model_config.architecture == "Qwen2_5_VLForConditionalGeneration"
