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
