"""Sliding-window attention in the shared decoder, end to end against Hugging Face.

A tiny Qwen2.5-VL whose text config sets `use_sliding_window` with a 19-token window (not a
multiple of the 16-slot blocks) and `max_window_layers=1`: transformers then slides layer 1
only, and applies the window on its eager / sdpa path (`create_sliding_window_causal_mask`).
The prompts (two and three images) are far longer than the window, the greedy answers cross it
again, and chunked prefill and the prefix cache split the prompt at other points. A tiny Mistral 3
(Mistral decoder: `sliding_window` slides every layer, as HF Mistral's sdpa path masks) runs against
its reference too. The kernels are tested in `test_ops_paged_attention.py` / `test_fast_path.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, PretrainedConfig

from tests.hf_reference import TEST_DEVICE, TEST_DTYPE, HFReference, compare_with_reference
from vlmx import LLM, SamplingParams
from vlmx.layers.attention import attend_fully_within
from vlmx.layers.decoder import DecoderConfig, DecoderModel, sliding_windows

WINDOW = 19
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)
QUESTION = "Compare the images."


@pytest.fixture(scope="module")
def windowed_ckpt(tmp_path_factory, qwen_tokenizer) -> str:
    from vlmx.demo.checkpoint import build_tiny_checkpoint

    path = Path(tmp_path_factory.mktemp("qwen2_5_vl-window"))
    build_tiny_checkpoint(path, "qwen2_5_vl", "transformers", seed=3, tokenizer=qwen_tokenizer)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    text.pop("layer_types", None)  # derived again from max_window_layers by the config class
    text.update(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def ref(windowed_ckpt) -> HFReference:
    return HFReference(windowed_ckpt, "qwen2_5_vl")


def _prompts(ref: HFReference, images) -> list[tuple[str, list]]:
    groups = [images[1:3], images[2:5]]
    return [(ref.chat_prompt(len(g), QUESTION), g) for g in groups]


def _llm(path: str, **kwargs) -> LLM:
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, max_model_len=1024, **kwargs)


def _generate(llm: LLM, prompts):
    inputs = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in prompts]
    return llm.generate(inputs, GREEDY, use_tqdm=False)


def test_layers_slide_as_transformers_decides(windowed_ckpt):
    text = AutoConfig.from_pretrained(windowed_ckpt).text_config
    assert text.layer_types == ["full_attention", "sliding_attention"]
    assert sliding_windows(text) == (None, WINDOW)
    text.use_sliding_window = False  # a checkpoint that turns the window off
    assert sliding_windows(text) == (None, None)
    mistral = PretrainedConfig(num_hidden_layers=3, sliding_window=4096)  # no layer_types
    assert sliding_windows(mistral) == (4096, 4096, 4096)
    with pytest.raises(ValueError, match="layer_types"):
        odd = PretrainedConfig(num_hidden_layers=2, sliding_window=8)
        odd.layer_types = ["chunked_attention", "full_attention"]
        sliding_windows(odd)
    with pytest.raises(ValueError, match="layer_windows has 1 entries"):
        DecoderConfig(
            **{**DecoderConfig.fields_from_hf(text), "num_layers": 2},
            rope_theta=1e6,
            layer_windows=(4,),
        )


def test_windows_of_at_least_max_model_len_attend_fully():
    fields = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3)
    dims = dict(num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4)
    model = DecoderModel(DecoderConfig(**fields, **dims, layer_windows=(None, 19, 40)))

    def windows() -> list[int | None]:
        return [layer.self_attn.attn.sliding_window for layer in model.layers]

    assert windows() == [None, 19, 40]
    attend_fully_within(model, 32)
    assert windows() == [None, 19, None]


def test_hf_applies_the_window(ref, test_images):
    """The reference itself masks: with the window off its logits change."""
    prompt, images = _prompts(ref, test_images)[0]
    inputs = ref.inputs(prompt, images)
    assert inputs["input_ids"].shape[1] > 4 * WINDOW
    with torch.inference_mode():
        windowed = ref.model(**inputs).logits
        ref.model.config.text_config.layer_types = ["full_attention"] * 2
        ref.model.model.language_model.has_sliding_layers = False
        try:
            full = ref.model(**inputs).logits
        finally:
            ref.model.config.text_config.layer_types = ["full_attention", "sliding_attention"]
            ref.model.model.language_model.has_sliding_layers = True
    assert (windowed - full).abs().max() > 1e-3


def test_generate_matches_reference_across_the_window(windowed_ckpt, ref, test_images):
    llm = _llm(windowed_ckpt)
    prompts = _prompts(ref, test_images)
    outputs = _generate(llm, prompts)
    for (prompt, images), output in zip(prompts, outputs):
        assert len(output.prompt_token_ids) > 4 * WINDOW
        assert len(output.outputs[0].token_ids) == GREEDY.max_tokens
        compare_with_reference(ref, prompt, images, output)
    swapped = _generate(llm, [(prompts[0][0], prompts[0][1][::-1])])[0]
    assert _first_logprobs(swapped) != _first_logprobs(outputs[0])


def _first_logprobs(output) -> dict[int, float]:
    return {t: round(lp.logprob, 4) for t, lp in output.outputs[0].logprobs[0].items()}


def test_mistral_decoder_slides_every_layer_as_hf(tmp_path, test_images):
    from transformers import Mistral3ForConditionalGeneration

    from tests.families.pixtral_checkpoint import build_pixtral_checkpoint

    path = Path(build_pixtral_checkpoint(tmp_path / "mistral3", "mistral3"))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["sliding_window"] = WINDOW
    (path / "config.json").write_text(json.dumps(config))
    ref = HFReference(str(path), model_cls=Mistral3ForConditionalGeneration)
    prompts = [(ref.chat_prompt(2, QUESTION), [test_images[0], test_images[3]])]
    llm = _llm(str(path), max_num_batched_tokens=24, max_num_seqs=2)
    for output in (_generate(llm, prompts)[0], _generate(llm, prompts)[0]):
        assert len(output.prompt_token_ids) > 4 * WINDOW
        compare_with_reference(ref, *prompts[0], output)


def test_chunked_prefill_and_prefix_cache_match_reference(windowed_ckpt, ref, test_images):
    prompts = _prompts(ref, test_images)
    llm = _llm(windowed_ckpt, max_num_batched_tokens=24, max_num_seqs=2)
    first = _generate(llm, prompts)
    again = _generate(llm, prompts)  # hits the prefix cache
    assert all(o.num_cached_tokens > WINDOW for o in again)
    for outputs in (first, again):
        for (prompt, images), output in zip(prompts, outputs):
            compare_with_reference(ref, prompt, images, output)
