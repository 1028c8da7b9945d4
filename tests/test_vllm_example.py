"""vLLM's offline multi-image example, Qwen2-VL and Qwen2.5-VL entries, with only the imports and
the model path changed (and the image URLs pointing at a loopback server instead of the web)."""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import NamedTuple

import pytest
from PIL.Image import Image
from transformers import AutoProcessor

from tests.hf_reference import HFReference, compare_with_reference
from tests.loopback import serve_files
from vlmx import LLM, EngineArgs, SamplingParams
from vlmx.lora.request import LoRARequest
from vlmx.multimodal import fetch_image

QUESTION = "What is the content of each image?"


class ModelRequestData(NamedTuple):
    engine_args: EngineArgs
    prompt: str
    image_data: list[Image]
    stop_token_ids: list[int] | None = None
    chat_template: str | None = None
    lora_requests: list[LoRARequest] | None = None


def load_qwen_vl(model_name: str, question: str, image_urls: list[str]) -> ModelRequestData:
    # The example's load_qwen2_vl / load_qwen2_5_vl (without qwen-vl-utils installed).
    engine_args = EngineArgs(
        model=model_name,
        max_model_len=32768,
        max_num_seqs=5,
        limit_mm_per_prompt={"image": len(image_urls)},
    )
    placeholders = [{"type": "image", "image": url} for url in image_urls]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [*placeholders, {"type": "text", "text": question}]},
    ]
    processor = AutoProcessor.from_pretrained(model_name)
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_data = [fetch_image(url) for url in image_urls]
    return ModelRequestData(engine_args=engine_args, prompt=prompt, image_data=image_data)


def run_generate(req_data: ModelRequestData, seed: int | None):
    engine_args = asdict(req_data.engine_args) | {"seed": seed}
    llm = LLM(**engine_args)
    sampling_params = SamplingParams(
        temperature=0.0, max_tokens=128, stop_token_ids=req_data.stop_token_ids
    )
    return llm.generate(
        {"prompt": req_data.prompt, "multi_modal_data": {"image": req_data.image_data}},
        sampling_params=sampling_params,
    )


def run_chat(req_data: ModelRequestData, question: str, image_urls: list[str], seed: int | None):
    engine_args = asdict(req_data.engine_args) | {"seed": seed}
    llm = LLM(**engine_args)
    sampling_params = SamplingParams(
        temperature=0.0, max_tokens=128, stop_token_ids=req_data.stop_token_ids
    )
    return llm.chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    *(
                        {"type": "image_url", "image_url": {"url": image_url}}
                        for image_url in image_urls
                    ),
                ],
            }
        ],
        sampling_params=sampling_params,
        chat_template=req_data.chat_template,
    )


@pytest.fixture(scope="module")
def image_urls(test_images):
    """Two PNGs served over loopback HTTP, as the example fetches its images from the web."""
    files = {}
    for i, image in enumerate(test_images[:2]):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        files[f"/img{i}.png"] = (buf.getvalue(), "image/png")
    with serve_files(files) as url:
        yield [url + path for path in files]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vllm_multi_image_example_runs_and_matches_reference(family, request, image_urls):
    model_path = request.getfixturevalue(f"{family}_hub_ckpt")
    ref = HFReference(model_path, family)
    req_data = load_qwen_vl(model_path, QUESTION, image_urls)

    generated = run_generate(req_data, seed=None)
    assert len(generated) == 1 and len(generated[0].outputs[0].token_ids) == 128
    compare_with_reference(ref, req_data.prompt, req_data.image_data, generated[0])

    chatted = run_chat(req_data, QUESTION, image_urls, seed=0)
    content = [{"type": "text", "text": QUESTION}] + [{"type": "image"}] * len(image_urls)
    chat_prompt = ref.processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert chatted[0].prompt == chat_prompt
    compare_with_reference(ref, chat_prompt, req_data.image_data, chatted[0])
