"""`vlmx generate --model ...` for every supported family, through both methods."""

from __future__ import annotations

import pytest

from tests.families.aria_checkpoint import build_checkpoint as build_aria_checkpoint
from tests.families.gemma3_checkpoint import build_gemma3_checkpoint
from tests.families.h2ovl_checkpoint import build_h2ovl_checkpoint
from tests.families.idefics3_checkpoint import build_checkpoint as build_idefics3_checkpoint
from tests.families.internvl_checkpoint import build_internvl_checkpoint
from tests.families.llava_onevision_checkpoint import build_llava_onevision_checkpoint
from tests.families.mllama_checkpoint import build_mllama_checkpoint
from tests.families.phi3v_checkpoint import build_phi3v_checkpoint
from tests.families.phi4mm_checkpoint import build_phi4mm_checkpoint
from tests.families.pixtral_checkpoint import build_pixtral_checkpoint
from tests.families.qwen3_vl_checkpoint import build_qwen3_vl_checkpoint
from tests.families.qwen_vl_checkpoint import CHATML_PARTS
from tests.families.qwen_vl_checkpoint import build_checkpoint as build_qwen_vl_checkpoint
from vlmx.cli import main
from vlmx.demo.checkpoint import demo_images

BUILDERS = {
    "gemma3": lambda path: build_gemma3_checkpoint(path),
    "idefics3": lambda path: build_idefics3_checkpoint(path, "idefics3"),
    "smolvlm": lambda path: build_idefics3_checkpoint(path, "smolvlm"),
    "pixtral": lambda path: build_pixtral_checkpoint(path, "llava"),
    "mistral3": lambda path: build_pixtral_checkpoint(path, "mistral3"),
    "internvl": lambda path: build_internvl_checkpoint(path),
    "llava_onevision": lambda path: build_llava_onevision_checkpoint(path),
    "qwen3_vl": lambda path: build_qwen3_vl_checkpoint(path),
    "aria": lambda path: build_aria_checkpoint(path),
    "mllama": lambda path: build_mllama_checkpoint(path),
    "phi4mm": lambda path: build_phi4mm_checkpoint(path),
    "phi3v": lambda path: build_phi3v_checkpoint(path),
    "qwen_vl": lambda path: build_qwen_vl_checkpoint(path, CHATML_PARTS),  # published layout
    "h2ovl": lambda path: build_h2ovl_checkpoint(path),
}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_generate_and_chat_methods_give_the_same_answer(family, tmp_path, capsys):
    path = BUILDERS[family](tmp_path / family)
    answers = []
    for method in ("generate", "chat"):
        args = ["generate", "--model", str(path), "--method", method, "--max-tokens", "4"]
        args += ["--device", "cpu", "--image", demo_images()[0], "--image", demo_images()[1]]
        assert main([*args, "What is in each image?"]) == 0
        out, err = capsys.readouterr()
        assert "2 images" in err and "4 output tokens" in err
        answers.append(out)
    assert answers[0] == answers[1]
