"""The `aria` bench preset: rhymes-ai/Aria's published shapes, built without weights (on the meta
device: no real-size model is made on this machine), and a folder both engines can read."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from vlmx.bench.presets import PRESETS, preset_path
from vlmx.bench.workloads import prompt_form
from vlmx.models.aria import AriaForConditionalGeneration


def test_aria_preset_has_the_published_size():
    assert PRESETS["aria"][0] == "aria"
    path = preset_path("aria")
    config = AutoConfig.from_pretrained(path)
    raw = json.loads(Path(path, "config.json").read_text())
    assert raw["model_type"] == "aria" and raw["architectures"] == ["AriaForConditionalGeneration"]
    with torch.device("meta"):
        model = AriaForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    assert 25.0e9 < total < 25.6e9  # "25.3B parameters"
    text = config.text_config
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    tower = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vision_tower."))
    embed = text.vocab_size * text.hidden_size
    active = total - experts * (1 - text.moe_topk / text.moe_num_experts) - tower - embed
    assert 3.6e9 < active < 4.1e9  # "3.9B activated parameters per token" (decoder + head)


def test_aria_preset_prompt_form_and_processor():
    path = preset_path("aria")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = prompt_form("aria")("a question", 2)
    ids = tokenizer.encode(prompt)
    assert ids.count(9) == 2 and max(ids) < 100352
    processor = AutoProcessor.from_pretrained(path)
    assert processor.image_token_id == 9
    assert processor.size_conversion == {490: 128, 980: 256}
