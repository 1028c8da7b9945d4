"""Aria against transformers, on a tiny random checkpoint (CPU float32 unless VLMX_TEST_*).

Processor: pixel values, valid sizes (HF's pixel_mask) and token ids equal HF's `AriaProcessor`
over many image sizes and mm_processor_kwargs (split_image, max_image_size, min_image_size).
Model: image features and prefill logits equal HF's. Engine: `LLM.generate` with vLLM's example
prompt form and `LLM.chat` match HF's teacher-forced logprobs and greedy tokens with 2 and 3
images, under prefix caching and chunked prefill; swapping images changes the logprobs.
"""

from __future__ import annotations

import base64
import copy
import io
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AriaForConditionalGeneration as HFAria
from transformers import AutoConfig, AutoTokenizer

from tests.families.aria_checkpoint import SIZE_CONVERSION, build_checkpoint
from tests.hf_reference import (
    TEST_ATOL,
    TEST_DEVICE,
    TEST_DTYPE,
    HFReference,
    compare_with_reference,
)
from vlmx import LLM, EngineArgs, SamplingParams
from vlmx.config import ModelConfig
from vlmx.demo.images import structured_image
from vlmx.layers.attention import AttentionMetadata
from vlmx.models.aria import AriaForConditionalGeneration
from vlmx.models.aria_processor import AriaProcessor
from vlmx.models.loader import build_model

ARCH = "AriaForConditionalGeneration"
QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3)
ATOL = 2e-3
# (width, height): square, wide, tall, 4:3, small (upscaled), very wide, odd
IMAGE_SIZES = ((224, 224), (320, 160), (150, 330), (400, 300), (20, 30), (600, 90), (97, 33))
PROCESSOR_KWARGS = (
    {},
    {"max_image_size": 490},
    {"split_image": True},
    {"split_image": True, "max_image_size": 490},
    {"min_image_size": 100},
)


class Reference(HFReference):
    kwargs: dict = {}

    def inputs(self, prompt: str, images: list) -> dict:
        out = self.processor(
            text=[prompt], images=images or None, return_tensors="pt", **self.kwargs
        )
        out.pop("num_crops", None)
        return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("aria") / "aria")
    return path, Reference(path, model_cls=HFAria)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [structured_image(w, h, i) for i, (w, h) in enumerate(IMAGE_SIZES)]


@pytest.fixture(scope="module")
def llm(ckpt):
    return _llm(ckpt[0], enable_prefix_caching=True)


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 4096)
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, **kwargs)


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def _processor(path: str, **mm_processor_kwargs) -> AriaProcessor:
    config = ModelConfig(
        model=path,
        model_path=path,
        tokenizer_path=path,
        tokenizer_mode="auto",
        trust_remote_code=False,
        hf_config=AutoConfig.from_pretrained(path),
        architecture=ARCH,
        dtype=torch.float32,
        max_model_len=8192,
        mm_processor_kwargs=mm_processor_kwargs,
    )
    return AriaProcessor(config, AutoTokenizer.from_pretrained(path), torch.device("cpu"))


def _prompt(num_images: int, question: str = QUESTION) -> str:
    """vLLM's multi-image example prompt for Aria."""
    placeholders = "<fim_prefix><|img|><fim_suffix>\n" * num_images
    return f"<|im_start|>user\n{placeholders}{question}<|im_end|>\n<|im_start|>assistant\n"


# --- processor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", PROCESSOR_KWARGS, ids=lambda k: str(k) or "defaults")
def test_processor_matches_hf(ckpt, images, kwargs) -> None:
    path, ref = ckpt
    ours = _processor(path)
    tokenizer = ref.processor.tokenizer
    for image in images:  # one image a prompt: HF pads num_crops to the batch's largest
        prompt = _prompt(1)
        hf = ref.processor(text=[prompt], images=[image], return_tensors="pt", **kwargs)
        processed = ours.process(tokenizer.encode(prompt), [_tensor(image)], kwargs)
        assert processed.prompt_token_ids == hf["input_ids"][0].tolist()
        [feature] = processed.mm_features
        pixels, valid = feature.data["pixel_values"], feature.data["valid_size"]
        assert pixels.shape == hf["pixel_values"].shape
        assert (pixels - hf["pixel_values"]).abs().max() < 1e-5
        mask = torch.zeros_like(hf["pixel_mask"])
        for i, (h, w) in enumerate(valid.tolist()):
            mask[i, :h, :w] = True
        assert torch.equal(mask, hf["pixel_mask"])
        m = kwargs.get("max_image_size", 980)
        assert feature.num_embeds == pixels.shape[0] * SIZE_CONVERSION[m]


def test_processor_errors(ckpt, images) -> None:
    path, _ = ckpt
    ours = _processor(path)
    ids = ours.tokenizer.encode(_prompt(2))
    two = [_tensor(images[0]), _tensor(images[1])]
    with pytest.raises(ValueError, match=r"2 image placeholders \(<\|img\|>\) but 1 images"):
        ours.process(ids, two[:1], {})
    with pytest.raises(ValueError, match="max_image_size=640 must be 490 or 980"):
        ours.process(ids, two, {"max_image_size": 640})
    with pytest.raises(ValueError, match=r"unknown mm_processor_kwargs \['do_pan'\] for Aria"):
        ours.process(ids, two, {"do_pan": True})
    with pytest.raises(ValueError, match="split_image='yes' must be bool"):
        ours.process(ids, two, {"split_image": "yes"})
    with pytest.raises(ValueError, match="min_image_size=600 exceeds max_image_size=490"):
        ours.process(ids, two, {"min_image_size": 600, "max_image_size": 490})
    # an already expanded prompt (HF's processor ids) is accepted as it is
    expanded = _processor(path).process(ids, two, {}).prompt_token_ids
    assert ours.process(expanded, two, {}).prompt_token_ids == expanded


# --- model -------------------------------------------------------------------------------------


def _kv_caches(model) -> list[torch.Tensor]:
    shape = (2, 64, 16, model.num_kv_heads, model.head_dim)
    return [torch.full(shape, float("nan")) for _ in range(model.num_layers)]


def _metadata(num_cached: list[int], num_new: list[int], block_size: int = 16) -> AttentionMetadata:
    """Sequences in consecutive blocks (seq i owns blocks 64*i ...), this step's rows at the end."""
    query_start_loc, slots, tables = [0], [], []
    for i, (cached, new) in enumerate(zip(num_cached, num_new)):
        query_start_loc.append(query_start_loc[-1] + new)
        slots += [64 * i * block_size + t for t in range(cached, cached + new)]
        tables.append([64 * i + b for b in range(64)])
    seq_lens = [c + n for c, n in zip(num_cached, num_new)]
    return AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )


def test_image_features_and_prefill_match_hf(ckpt, images) -> None:
    path, ref = ckpt
    model = build_model(ARCH, ref.model.config, path, torch.device("cpu"), torch.float32)
    ours = _processor(path)
    tokenizer = ref.processor.tokenizer
    split = {"split_image": True, "max_image_size": 490}  # 2 crops of 490 px
    for kwargs, group in (({}, images[:2]), (split, images[3:4])):
        for image in group:  # HF's crops per image are the batch's largest count
            prompt = _prompt(1)
            hf_inputs = ref.processor(text=[prompt], images=[image], return_tensors="pt", **kwargs)
            hf_inputs.pop("num_crops", None)
            processed = ours.process(tokenizer.encode(prompt), [_tensor(image)], kwargs)
            assert processed.mm_features[0].data["pixel_values"].shape[0] == (2 if kwargs else 1)
            [embeds] = model.encode_images(processed.mm_features)
            expected = ref.model.model.get_image_features(
                hf_inputs["pixel_values"], hf_inputs["pixel_mask"]
            ).pooler_output
            expected = expected.flatten(0, 1)  # float32 noise, relative to the 10x weights
            assert (embeds - expected).abs().max() < 1e-4 * expected.abs().max().clamp(min=1)
            ids = torch.tensor(processed.prompt_token_ids)
            e = model.embed_tokens(ids)
            f = processed.mm_features[0]
            e[f.placeholder.offset : f.placeholder.end] = embeds
            n = e.shape[0]
            logits = model.compute_logits(
                model(e, torch.arange(n), _kv_caches(model), _metadata([0], [n]))
            )
            hf_logits = ref.model(**hf_inputs).logits[0]
            # NOTE: the patch embedding (a 14700-wide matmul here, HF's Conv2d) differs by ~4e-6
            # relative in float32; the 10x weights carry it to ~1e-3 in these logits
            assert (logits - hf_logits).abs().max() < 5e-3


def test_load_weights_rejects_missing_and_unexpected(ckpt) -> None:
    _, ref = ckpt
    state = {k: v for k, v in ref.model.state_dict().items()}
    # HF's module names (model.language_model..., experts.gate_up_proj) load as well
    AriaForConditionalGeneration(ref.model.config).load_weights(state.items())
    missing = {k: v for k, v in state.items() if "layers.1.mlp.experts.down_proj" not in k}
    with pytest.raises(ValueError, match=r"missing 1 weight.*experts\.down_proj"):
        AriaForConditionalGeneration(ref.model.config).load_weights(missing.items())
    config = copy.deepcopy(ref.model.config)
    config.vision_feature_layer = -2
    with pytest.raises(ValueError, match="vision_feature_layer=-2 is not supported"):
        AriaForConditionalGeneration(config)
    extra = dict(state)
    extra["model.multi_modal_projector.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.multi_modal_projector\.extra"):
        AriaForConditionalGeneration(ref.model.config).load_weights(extra.items())


# --- engine end to end -------------------------------------------------------------------------


def _generate(llm: LLM, batch, params=GREEDY, **extra):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}, **extra} for p, imgs in batch]
    return llm.generate(prompts, params, use_tqdm=False)


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_engine_matches_reference(ckpt, llm, images) -> None:
    path, ref = ckpt
    batch = [(_prompt(2), [images[0], images[1]]), (_prompt(3), [images[2], images[3], images[4]])]
    first = _generate(llm, batch)
    for (prompt, group), output in zip(batch, first):
        compare_with_reference(ref, prompt, group, output, atol=ATOL)

    second = _generate(llm, batch)  # prefix caching: same outputs from cached blocks
    assert all(o.num_cached_tokens > 0 for o in second)
    for a, b in zip(first, second):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids

    # chunked prefill: a budget smaller than one image's span splits the prompt inside it
    small = _llm(path, max_num_batched_tokens=6, max_num_seqs=4, enable_prefix_caching=False)
    chunked = _generate(small, batch)
    for a, b in zip(first, chunked):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(x[t].logprob - y[t].logprob) < max(ATOL, TEST_ATOL) for t in y)

    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    prompt = batch[0][0]
    swap = _generate(llm, [(prompt, images[:2]), (prompt, images[1::-1])], params)
    a, b = ({t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in swap)
    assert set(a) != set(b) or max(abs(a[t] - b[t]) for t in a) > 1e-3


def test_chat_matches_reference(ckpt, llm, images) -> None:
    _, ref = ckpt
    groups = [[images[3], images[0]], [images[1], images[4], images[5]]]
    conversations = []
    for group in groups:
        content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in group]
        content.append({"type": "text", "text": QUESTION})
        conversations.append([{"role": "user", "content": content}])
    outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    for group, output in zip(groups, outputs):
        prompt = ref.chat_prompt(len(group), QUESTION)
        assert output.prompt == prompt
        compare_with_reference(ref, prompt, group, output, ATOL)


def test_split_image_matches_reference(ckpt, llm, images) -> None:
    """Per-prompt split_image: each image several crops (HF pads a batch to its largest crop
    count, so the reference sees one image a prompt)."""
    _, ref = ckpt
    batch = [(_prompt(1), [images[5]])]
    kwargs = {"split_image": True, "max_image_size": 490}
    [output] = _generate(llm, batch, mm_processor_kwargs=kwargs)
    [whole] = _generate(llm, batch, mm_processor_kwargs={"max_image_size": 490})
    assert len(output.prompt_token_ids) > len(whole.prompt_token_ids)  # 2 crops, not 1
    ref.kwargs = kwargs
    try:
        compare_with_reference(ref, batch[0][0], batch[0][1], output, ATOL)
    finally:
        ref.kwargs = {}


def test_vllm_example_engine_args(ckpt, images) -> None:
    """The example's EngineArgs: tokenizer_mode='slow', trust_remote_code=True (no code in the
    folder runs either way), bfloat16 replaced by the test dtype."""
    path, ref = ckpt
    engine_args = EngineArgs(
        model=path,
        tokenizer_mode="slow",
        trust_remote_code=True,
        dtype=TEST_DTYPE,
        device=TEST_DEVICE,
        limit_mm_per_prompt={"image": 2},
    )
    llm = LLM(**asdict(engine_args))
    group = [images[2], images[3]]
    stop = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, stop_token_ids=[7, 8])
    [output] = _generate(llm, [(_prompt(2), group)], stop)
    compare_with_reference(ref, _prompt(2), group, output, ATOL)


def test_video_is_refused(llm, images) -> None:
    with pytest.raises(ValueError, match="video"):
        llm.generate({"prompt": _prompt(1), "multi_modal_data": {"video": [images[0]]}})
