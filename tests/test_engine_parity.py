"""vlmx against the Hugging Face reference, end to end, on tiny random checkpoints.

The reference always runs in float32 on the CPU. vlmx runs in float32 on the CPU unless
VLMX_TEST_DEVICE / VLMX_TEST_DTYPE say otherwise (e.g. cuda + bfloat16 for the GPU parity run;
then VLMX_TEST_ATOL sets the logprob tolerance, and each test prints the largest difference).
"""

from __future__ import annotations

import base64
import io

import pytest

from tests.hf_reference import (
    TEST_ATOL,
    TEST_DEVICE,
    TEST_DTYPE,
    HFReference,
    compare_with_reference,
)
from vlmx import LLM, SamplingParams

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
DEVICE, DTYPE, ATOL = TEST_DEVICE, TEST_DTYPE, TEST_ATOL


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 2048)
    return LLM(model=path, dtype=DTYPE, device=DEVICE, **kwargs)


def _compare(ref, prompt, images, output, label: str) -> None:
    diff = compare_with_reference(ref, prompt, images, output, atol=ATOL)
    print(f"[parity {DEVICE} {DTYPE}] {label}: max |logprob diff| = {diff:.2e}")


def _batch(ref: HFReference, images: list) -> list[tuple[str, list]]:
    """Three prompts with 1, 2 and 3 images of different sizes and aspect ratios."""
    groups = [images[:1], images[1:3], images[2:5]]
    return [(ref.chat_prompt(len(g), QUESTION), g) for g in groups]


def _generate(llm: LLM, batch, params=GREEDY):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in batch]
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def family_setup(request, test_images):
    family = request.param
    path = request.getfixturevalue(f"{family}_ckpt")
    ref = HFReference(path, family)
    return family, path, ref, _batch(ref, test_images)


def test_generate_matches_reference(family_setup):
    _, path, ref, batch = family_setup
    outputs = _generate(_llm(path), batch)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [6, 6, 6]
    for (prompt, images), output in zip(batch, outputs):
        _compare(ref, prompt, images, output, f"generate {len(images)} images")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_hub_layout_matches_reference(family, request, test_images):
    """Checkpoints as published on the hub (flat config, `model.layers.*` / `visual.*` names,
    sharded safetensors, preprocessor_config.json, chat_template.json) load and match."""
    path = request.getfixturevalue(f"{family}_hub_ckpt")
    ref = HFReference(path, family)
    batch = _batch(ref, test_images)[1:]
    for (prompt, images), output in zip(batch, _generate(_llm(path), batch)):
        _compare(ref, prompt, images, output, f"{family} hub layout, {len(images)} images")


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_matches_generate_and_reference(family_setup):
    _, path, ref, batch = family_setup
    llm = _llm(path)
    conversations = []
    for _, images in batch:
        content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]
        content.append({"type": "text", "text": QUESTION})
        conversations.append([{"role": "user", "content": content}])
    chat_outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    gen_outputs = _generate(llm, batch)
    for (prompt, images), chat, gen in zip(batch, chat_outputs, gen_outputs):
        assert chat.prompt_token_ids == gen.prompt_token_ids
        assert chat.outputs[0].token_ids == gen.outputs[0].token_ids
        _compare(ref, prompt, images, chat, f"chat {len(images)} images")


def _shared_prefix_batch(ref: HFReference, images: list) -> list[tuple[str, list]]:
    """Prompts that share a system prompt and a first image, and one that differs only in it."""
    system = "You are a careful assistant. " * 6

    def prompt(n):
        content = [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": QUESTION}]
        return ref.processor.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": content}],
            tokenize=False,
            add_generation_prompt=True,
        )

    return [
        (prompt(2), [images[0], images[1]]),
        (prompt(2), [images[0], images[3]]),
        (prompt(2), [images[4], images[1]]),  # same tokens as the first, other first image
        (prompt(1), [images[2]]),
    ]


def test_same_outputs_under_caching_chunking_and_preemption(family_setup, test_images):
    family, path, ref, _ = family_setup
    batch = _shared_prefix_batch(ref, test_images)
    baseline = _generate(_llm(path, enable_prefix_caching=False), batch)

    def check(outputs):
        for out, base in zip(outputs, baseline):
            assert out.prompt_token_ids == base.prompt_token_ids
            assert out.outputs[0].token_ids == base.outputs[0].token_ids
            for token, a, b in zip(
                base.outputs[0].token_ids, out.outputs[0].logprobs, base.outputs[0].logprobs
            ):
                # The sampled token is in both; the rest of the top-k may swap a near-tie in
                # bf16 when the batch is laid out differently.
                assert token in a and token in b
                for token_id in b.keys() & a.keys():
                    assert abs(a[token_id].logprob - b[token_id].logprob) < ATOL
                if TEST_DTYPE == "float32":
                    assert a.keys() == b.keys()

    # Prefix caching: a second run of the batch hits the cache for the shared parts; the
    # prompt that differs only in its first image must not reuse the first prompt's KV.
    llm = _llm(path, enable_prefix_caching=True)
    first = _generate(llm, batch)
    check(first)
    second = _generate(llm, batch)
    check(second)
    assert all(o.num_cached_tokens > 0 for o in second)
    # After the resets nothing is shared with earlier runs: the hits of a first run only (the
    # batch's prompts share a prefix), every image processed and encoded again, same outputs.
    engine = llm.llm_engine
    prompt, images = batch[0]
    engine.add_request("busy", {"prompt": prompt, "multi_modal_data": {"image": images}}, GREEDY)
    assert not llm.reset_prefix_cache() and not llm.reset_mm_cache()  # a request is unfinished
    engine.abort_request("busy")
    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    engine.media.load(data_url)
    assert len(engine.media.data_urls) > 0
    fresh = _llm(path, enable_prefix_caching=True, max_num_seqs=1)  # its own data URL cache
    fresh.llm_engine.media.load(data_url)
    assert llm.reset_prefix_cache() and llm.reset_mm_cache()
    assert not engine.executor.runner.encoder.outputs and len(engine.processor.cache) == 0
    assert len(engine.media.data_urls) == 0
    assert len(fresh.llm_engine.media.data_urls) == 1  # one engine's reset leaves another's
    third = _generate(llm, batch)
    check(third)
    cached = [o.num_cached_tokens for o in third]
    assert cached == [o.num_cached_tokens for o in first]
    assert all(c < o.num_cached_tokens for c, o in zip(cached, second))
    assert len(engine.processor.cache) == len({id(im) for _, ims in batch for im in ims})
    engine.scheduler.check_integrity()
    first_two = _generate(fresh, batch[:1]) + _generate(fresh, batch[2:3])
    image_start = first_two[0].prompt_token_ids.index(151655)
    assert first_two[1].num_cached_tokens <= image_start  # differs from the first image on
    check_pairs = [(first_two[0], baseline[0]), (first_two[1], baseline[2])]
    for out, base in check_pairs:
        assert out.outputs[0].token_ids == base.outputs[0].token_ids

    # Chunked prefill with a budget smaller than one image: chunks end inside image spans.
    image_tokens = [sum(1 for t in o.prompt_token_ids if t == 151655) for o in baseline]
    chunked = _llm(path, max_num_batched_tokens=24, max_num_seqs=4, enable_prefix_caching=False)
    assert min(image_tokens) > 24
    check(_generate(chunked, batch))

    # Preemption: a KV pool too small to hold the whole batch at once.
    longest = max(len(o.prompt_token_ids) for o in baseline) + GREEDY.max_tokens
    num_blocks = -(-longest // 16) + 2
    small = _llm(
        path,
        num_gpu_blocks_override=num_blocks,
        max_num_batched_tokens=32,
        max_num_seqs=4,
        enable_prefix_caching=False,
    )
    check(_generate(small, batch))
    assert small.llm_engine.scheduler.num_preemptions > 0
    small.llm_engine.scheduler.check_integrity()


def test_swapping_images_changes_logits(family_setup, test_images):
    _, path, ref, _ = family_setup
    prompt = ref.chat_prompt(2, QUESTION)
    a, b = test_images[0], test_images[1]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = _generate(_llm(path), [(prompt, [a, b]), (prompt, [b, a])], params)
    first, second = ({t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in out)
    assert set(first) != set(second) or max(abs(first[t] - second[t]) for t in first) > 1e-3
