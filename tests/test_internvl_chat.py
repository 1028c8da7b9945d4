"""InternVL in its published layout (`InternVLChatModel`, model_type "internvl_chat") against
transformers' `InternVLForConditionalGeneration` on the same weights (its native twin).

- loading: the published config.json / weight names (InternLM2's packed `wqkv`, the tower's
  `attn.qkv`, `mlp1.*`) give exactly the parameters of the native checkpoint;
- engine: `LLM.generate` with the published prompt form (`Image-i: <image>` lines in the chat
  template) against the HF reference (prompt ids, teacher-forced logprobs, greedy tokens),
  2 and 3 images of different sizes, with and without `max_dynamic_patch`; swapped images.
"""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLForConditionalGeneration as HFInternVL

from tests.families.internvl_chat_checkpoint import build_internvl_chat_checkpoints
from tests.family_helpers import assert_swap_changes_logprobs
from tests.hf_reference import TEST_DEVICE, TEST_DTYPE, HFReference, compare_with_reference
from vlmx import LLM, SamplingParams
from vlmx.demo.images import structured_image
from vlmx.models.loader import build_model, load_hf_config

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[str, str]:
    return build_internvl_chat_checkpoints(tmp_path_factory.mktemp("internvl-chat"))


@pytest.fixture(scope="module")
def ref(ckpts) -> HFReference:
    return HFReference(ckpts[1], model_cls=HFInternVL)


def published_prompt(llm: LLM, num_images: int) -> str:
    """The prompt of vLLM's example: the chat template over `Image-i: <image>` lines."""
    lines = "".join(f"Image-{i + 1}: <image>\n" for i in range(num_images))
    messages = [{"role": "user", "content": f"{lines}{QUESTION}"}]
    return llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def reference_prompt(prompt: str) -> str:
    """The same prompt for transformers' processor: <IMG_CONTEXT> where the text says <image>."""
    return prompt.replace("<image>", "<IMG_CONTEXT>")


def _llm(path: str, **kwargs) -> LLM:
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, max_model_len=2048, **kwargs)


def test_published_weights_load_as_the_native_checkpoint(ckpts) -> None:
    published, native = ckpts
    cpu = torch.device("cpu")
    ours = build_model(
        "InternVLChatModel", load_hf_config(published), published, cpu, torch.float32
    )
    twin = build_model(
        "InternVLForConditionalGeneration", load_hf_config(native), native, cpu, torch.float32
    )
    a, b = dict(ours.named_parameters()), dict(twin.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_config_reader_rejects_unsupported_layouts(ckpts) -> None:
    import json
    from pathlib import Path

    from vlmx.models.internvl_chat_config import read_published_config

    raw = json.loads((Path(ckpts[0]) / "config.json").read_text())
    config = read_published_config(raw)
    assert config.text_config.model_type == "llama"
    assert (config.min_dynamic_patch, config.max_dynamic_patch) == (1, 12)
    with pytest.raises(ValueError, match="ps_version"):
        read_published_config({**raw, "ps_version": "v1"})
    llm = {**raw["llm_config"], "architectures": ["MixtralForCausalLM"]}
    with pytest.raises(ValueError, match="MixtralForCausalLM"):
        read_published_config({**raw, "llm_config": llm})
    llm = {**raw["llm_config"], "bias": True}
    with pytest.raises(ValueError, match="bias"):
        read_published_config({**raw, "llm_config": llm})


@pytest.mark.parametrize("kwargs", [{}, {"max_dynamic_patch": 4}])
def test_generate_matches_reference(ckpts, ref, test_images, kwargs) -> None:
    llm = _llm(ckpts[0])
    groups = [test_images[1:3], test_images[2:5]]
    prompts = [published_prompt(llm, len(g)) for g in groups]
    inputs = [
        {"prompt": p, "multi_modal_data": {"image": g}, "mm_processor_kwargs": kwargs}
        for p, g in zip(prompts, groups)
    ]
    outputs = llm.generate(inputs, GREEDY, use_tqdm=False)
    hf_kwargs = {"max_patches": kwargs["max_dynamic_patch"]} if kwargs else {}
    ref_inputs = ref.inputs
    ref.inputs = lambda prompt, images: ref.processor(
        text=[prompt], images=images, return_tensors="pt", **hf_kwargs
    )
    try:
        for prompt, images, output in zip(prompts, groups, outputs, strict=True):
            assert len(output.outputs[0].token_ids) == GREEDY.max_tokens
            compare_with_reference(ref, reference_prompt(prompt), images, output)
    finally:
        ref.inputs = ref_inputs


def test_swapping_images_changes_logprobs(ckpts) -> None:
    llm = _llm(ckpts[0])
    prompt = published_prompt(llm, 2)
    a, b = structured_image(224, 168, 0), structured_image(224, 168, 5)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = llm.generate(
        [
            {"prompt": prompt, "multi_modal_data": {"image": [a, b]}},
            {"prompt": prompt, "multi_modal_data": {"image": [b, a]}},
        ],
        params,
        use_tqdm=False,
    )
    assert_swap_changes_logprobs(*out)
