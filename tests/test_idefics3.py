"""Idefics3 and SmolVLM against transformers, on tiny random checkpoints (CPU, float32).

Processor: pixel values, tile grids and placeholder layouts equal HF's `Idefics3Processor` /
`SmolVLMProcessor` over many image sizes and mm_processor_kwargs; the LANCZOS kernel used off
the CPU equals torch's CPU kernel bit for bit. Model: image features and prefill logits (one shot,
chunked inside an image, two sequences in one flat batch) equal HF's. Engine: `LLM.generate` with
vLLM's example prompt and `LLM.chat` with data URLs match HF's teacher-forced logprobs and greedy
tokens, under prefix caching and chunked prefill; swapping images changes the logprobs.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer
from transformers import Idefics3ForConditionalGeneration as HFIdefics3
from transformers import SmolVLMForConditionalGeneration as HFSmolVLM

from tests.families.idefics3_checkpoint import FAMILIES, IMAGE_SEQ_LEN, build_checkpoint, token_ids
from tests.hf_reference import TEST_DEVICE, TEST_DTYPE, HFReference, compare_with_reference
from vlmx import LLM, EngineArgs, SamplingParams
from vlmx.config import ModelConfig
from vlmx.demo.images import structured_image
from vlmx.layers.attention import AttentionMetadata
from vlmx.models.idefics3_processor import Idefics3Processor
from vlmx.models.loader import build_model

HF_CLASSES = {"idefics3": HFIdefics3, "smolvlm": HFSmolVLM}
ARCHITECTURES = {
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}
QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3)
ATOL = 2e-3
# (width, height): square, wide, tall, 4:3, small (upscaled), exact tile, odd, very wide
IMAGE_SIZES = ((224, 224), (320, 160), (150, 330), (400, 300), (20, 30), (96, 96), (97, 33))
PROCESSOR_KWARGS = (
    {},
    {"size": {"longest_edge": 64}},
    {"size": {"longest_edge": 200}},
    {"do_image_splitting": False},
    {"do_resize": False},
)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, checkpoint path, HF reference)."""
    name = request.param
    path = build_checkpoint(tmp_path_factory.mktemp(name), name)
    return name, path, Reference(path, model_cls=HF_CLASSES[name])


@pytest.fixture(scope="module")
def llm(family):
    """One engine per family (prefix caching on), shared by the end-to-end tests."""
    return _llm(family[1], enable_prefix_caching=True)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [structured_image(w, h, i) for i, (w, h) in enumerate(IMAGE_SIZES)]


class Reference(HFReference):
    """HF reference with image-processor kwargs and a choice of bos handling for the text."""

    kwargs: dict = {}
    add_special_tokens: bool = True

    def inputs(self, prompt: str, images: list) -> dict:
        return self.processor(
            text=[prompt],
            images=images or None,
            return_tensors="pt",
            add_special_tokens=self.add_special_tokens,
            **self.kwargs,
        )


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def _processor(path: str, name: str, **mm_processor_kwargs) -> Idefics3Processor:
    config = ModelConfig(
        model=path,
        model_path=path,
        tokenizer_path=path,
        tokenizer_mode="auto",
        trust_remote_code=False,
        hf_config=AutoConfig.from_pretrained(path),
        architecture=ARCHITECTURES[name],
        dtype=torch.float32,
        max_model_len=8192,
        mm_processor_kwargs=mm_processor_kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)  # the engine's, as the engine passes it
    return Idefics3Processor(config, tokenizer, torch.device("cpu"))


def _example_prompt(name: str, num_images: int, question: str = QUESTION) -> str:
    """vLLM's multi-image example prompt for Idefics3 (SmolVLM: its own bos)."""
    bos = FAMILIES[name][0]
    placeholders = "\n".join(f"Image-{i}: <image>\n" for i in range(1, num_images + 1))
    return f"{bos}User:{placeholders}\n{question}<end_of_utterance>\nAssistant:"


# --- processor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", PROCESSOR_KWARGS, ids=lambda k: str(k) or "defaults")
def test_processor_matches_hf(family, images, kwargs) -> None:
    name, path, ref = family
    ours = _processor(path, name)
    hf_image_processor = ref.processor.image_processor
    settings = ours.prompt_settings(kwargs)
    pixel_values = ours.preprocess([_tensor(im) for im in images], settings)
    for image, pixels in zip(images, pixel_values):
        hf = hf_image_processor([[image]], return_tensors="pt", return_row_col_info=True, **kwargs)
        expected = hf["pixel_values"][0]  # [num_frames, 3, M, M]
        assert pixels.shape == expected.shape, (image.size, kwargs)
        assert (pixels - expected).abs().max().item() < 1e-5, (image.size, kwargs)

    # Placeholder layout: the example prompt, expanded, equals HF's processor ids.
    prompt = _example_prompt(name, 3)
    group = images[1:4]
    hf_ids = ref.processor(text=[prompt], images=group, return_tensors="pt", **kwargs)
    prompt_ids = ref.processor.tokenizer.encode(prompt)
    processed = ours.process(prompt_ids, [_tensor(im) for im in group], kwargs)
    assert processed.prompt_token_ids == hf_ids["input_ids"][0].tolist()
    image_id = token_ids(name)["<image>"]
    for feature, pixels in zip(processed.mm_features, pixel_values[1:4]):
        span = processed.prompt_token_ids[feature.placeholder.offset : feature.placeholder.end]
        assert span == feature.data["layout_ids"].tolist()
        assert span.count(image_id) == pixels.shape[0] * IMAGE_SEQ_LEN
        assert torch.equal(feature.data["pixel_values"], pixels)

    # Already-expanded ids (from HF's processor) are taken as they are.
    again = ours.process(hf_ids["input_ids"][0].tolist(), [_tensor(im) for im in group], kwargs)
    assert again.prompt_token_ids == processed.prompt_token_ids
    assert [f.placeholder for f in again.mm_features] == [
        f.placeholder for f in processed.mm_features
    ]


def test_processor_engine_wide_kwargs_and_cache(family, images) -> None:
    name, path, _ = family
    engine_wide = _processor(path, name, size={"longest_edge": 64})
    default = _processor(path, name)
    ids = [1, 2, token_ids(name)["<image>"], 3]
    image = _tensor(images[0])
    a = engine_wide.process(ids, [image], {})
    b = default.process(ids, [image], {"size": {"longest_edge": 64}})
    c = default.process(ids, [image], {})
    assert a.prompt_token_ids == b.prompt_token_ids != c.prompt_token_ids
    assert a.mm_features[0].mm_hash == b.mm_features[0].mm_hash != c.mm_features[0].mm_hash
    assert len(default.cache) == 2
    default.process(ids, [image], {})
    assert len(default.cache) == 2  # served from the cache


def test_processor_errors(family, images) -> None:
    name, path, _ = family
    ours = _processor(path, name)
    image_id = token_ids(name)["<image>"]
    image = _tensor(images[0])
    with pytest.raises(ValueError, match=r"2 image placeholders \(<image>\) but 1 images"):
        ours.process([1, image_id, 2, image_id], [image], {})
    with pytest.raises(ValueError, match="unknown mm_processor_kwargs.*max_pixels.*supported"):
        ours.process([image_id], [image], {"max_pixels": 1000})
    with pytest.raises(ValueError, match="longest_edge"):
        ours.process([image_id], [image], {"size": 64})
    with pytest.raises(ValueError, match="do_image_splitting"):
        ours.process([image_id], [image], {"do_image_splitting": "yes"})
    side = FAMILIES[name][3]
    with pytest.raises(ValueError, match="tokens per tile"):
        ours.process([image_id], [image], {"max_image_size": {"longest_edge": side // 2}})
    ours.process([image_id], [image], {"max_image_size": {"longest_edge": side}})  # the default
    with pytest.raises(ValueError, match="uint8"):
        ours.process([image_id], [image.float()], {})
    with pytest.raises(ValueError, match="not match this image"):
        expanded = ours.process([image_id], [image], {}).prompt_token_ids
        ours.process(expanded, [_tensor(images[1])], {})


# --- model -------------------------------------------------------------------------------------


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


@torch.no_grad()
def test_image_features_and_prefill_match_hf(family, images) -> None:
    name, path, ref = family
    model = build_model(
        ARCHITECTURES[name], ref.model.config, path, torch.device("cpu"), torch.float32
    )
    ours = _processor(path, name)
    image_id = token_ids(name)["<image>"]
    prompts = []
    for group in (images[:2], images[2:5]):
        prompt = _example_prompt(name, len(group))
        hf_inputs = ref.inputs(prompt, group)
        processed = ours.process(
            ref.processor.tokenizer.encode(prompt), [_tensor(im) for im in group], {}
        )
        assert processed.prompt_token_ids == hf_inputs["input_ids"][0].tolist()
        prompts.append((hf_inputs, processed))

    # (1) image features: all images of both prompts in one call
    features = [f for _, p in prompts for f in p.mm_features]
    encoded = model.encode_images(features)
    hf_features = []
    for hf_inputs, processed in prompts:
        out = ref.model.model.get_image_features(
            hf_inputs["pixel_values"], hf_inputs["pixel_attention_mask"]
        )
        sizes = [f.data["pixel_values"].shape[0] * IMAGE_SEQ_LEN for f in processed.mm_features]
        hf_features += list(out.pooler_output[0].split(sizes))
    for feature, embeds, expected in zip(features, encoded, hf_features):
        is_image = feature.data["layout_ids"] == image_id
        assert embeds.shape == (feature.num_embeds, model.config.hidden_size)
        assert (embeds[is_image] - expected.reshape(-1, expected.shape[-1])).abs().max() < 1e-5
        text = model.embed_tokens(feature.data["layout_ids"][~is_image])
        assert torch.equal(embeds[~is_image], text)

    # (2) prefill logits: one shot, chunked inside an image, and both prompts in one flat batch
    embeds, hf_logits = [], []
    for (hf_inputs, processed), (start, end) in zip(prompts, ((0, 2), (2, 5))):
        ids = torch.tensor(processed.prompt_token_ids)
        e = model.embed_tokens(ids)
        for f, emb in zip(processed.mm_features, encoded[start:end]):
            e[f.placeholder.offset : f.placeholder.end] = emb
        embeds.append(e)
        hf_logits.append(ref.model(**hf_inputs).logits[0])
    kv = _kv_caches(model)
    for e, expected in zip(embeds, hf_logits):
        n = e.shape[0]
        logits = model.compute_logits(model(e, torch.arange(n), kv, _metadata([0], [n])))
        assert (logits - expected).abs().max() < 5e-4
    e, expected = embeds[1], hf_logits[1]
    split = prompts[1][1].mm_features[0].placeholder.offset + 7
    kv = _kv_caches(model)
    first = model(e[:split], torch.arange(split), kv, _metadata([0], [split]))
    rest = e.shape[0] - split
    second = model(e[split:], torch.arange(split, e.shape[0]), kv, _metadata([split], [rest]))
    assert (model.compute_logits(torch.cat([first, second])) - expected).abs().max() < 5e-4
    kv = _kv_caches(model)
    lengths = [x.shape[0] for x in embeds]
    positions = torch.cat([torch.arange(n) for n in lengths])
    hidden = model(torch.cat(embeds), positions, kv, _metadata([0, 0], lengths))
    for logits, expected in zip(model.compute_logits(hidden).split(lengths), hf_logits):
        assert (logits - expected).abs().max() < 5e-4


def _kv_caches(model) -> list[torch.Tensor]:
    shape = (2, 128, 16, model.num_kv_heads, model.head_dim)
    return [torch.full(shape, float("nan")) for _ in range(model.num_layers)]


def test_load_weights_rejects_missing_and_unexpected(family) -> None:
    name, _, ref = family
    from vlmx.models.idefics3 import Idefics3ForConditionalGeneration

    state = ref.model.state_dict()
    missing = {
        k: v for k, v in state.items() if "vision_model.encoder.layers.1.self_attn.k" not in k
    }
    with pytest.raises(ValueError, match=r"missing 2 weight"):
        Idefics3ForConditionalGeneration(ref.model.config).load_weights(missing.items())
    extra = dict(state)
    extra["model.connector.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.connector\.extra\.weight'"):
        Idefics3ForConditionalGeneration(ref.model.config).load_weights(extra.items())


# --- engine end to end -------------------------------------------------------------------------


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 4096)
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, **kwargs)


def _generate(llm: LLM, batch, params=GREEDY, **extra):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}, **extra} for p, imgs in batch]
    return llm.generate(prompts, params, use_tqdm=False)


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_engine_matches_reference(family, llm, images) -> None:
    name, path, ref = family
    batch = [
        (_example_prompt(name, 2), [images[0], images[1]]),
        (_example_prompt(name, 3), [images[2], images[3], images[4]]),
    ]
    first = _generate(llm, batch)
    for (prompt, group), output in zip(batch, first):
        compare_with_reference(ref, prompt, group, output, atol=ATOL)

    # prefix caching: the second run reuses the prompts' blocks and gives the same outputs
    second = _generate(llm, batch)
    assert all(o.num_cached_tokens > 0 for o in second)
    for a, b in zip(first, second):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(x[t].logprob - y[t].logprob) < ATOL for t in y)

    # chunked prefill with a budget smaller than one image's span
    chunked = _generate(
        _llm(path, max_num_batched_tokens=40, max_num_seqs=4, enable_prefix_caching=False), batch
    )
    assert min(f.num_embeds for f in _features(llm, batch[0])) > 40
    for a, b in zip(first, chunked):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids

    # swapping the two images changes the logprobs of the same prompt
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    prompt = batch[0][0]
    swap = _generate(
        llm, [(prompt, [images[0], images[1]]), (prompt, [images[1], images[0]])], params
    )
    a, b = ({t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in swap)
    assert set(a) != set(b) or max(abs(a[t] - b[t]) for t in a) > 1e-3


def _features(llm: LLM, item):
    prompt, group = item
    engine = llm.llm_engine
    _, processed = engine.process_prompt({"prompt": prompt, "multi_modal_data": {"image": group}})
    return processed.mm_features


def test_chat_matches_reference(family, llm, images) -> None:
    name, path, ref = family
    groups = [[images[3], images[0]], [images[1], images[4], images[2]]]
    conversations = []
    for group in groups:
        content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in group]
        content.append({"type": "text", "text": QUESTION})
        conversations.append([{"role": "user", "content": content}])
    outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    ref.add_special_tokens = False  # llm.chat tokenizes the rendered template as it is
    try:
        for group, output in zip(groups, outputs):
            compare_with_reference(ref, ref.chat_prompt(len(group), QUESTION), group, output, ATOL)
    finally:
        ref.add_special_tokens = True


@pytest.mark.parametrize(
    "kwargs", [{"size": {"longest_edge": 64}}, {"do_image_splitting": False}], ids=str
)
def test_mm_processor_kwargs_match_reference(family, llm, images, kwargs) -> None:
    """Per-prompt kwargs, against HF with the same image-processor kwargs."""
    name, path, ref = family
    batch = [(_example_prompt(name, 2), [images[3], images[1]])]
    per_prompt = _generate(llm, batch, mm_processor_kwargs=kwargs)
    default = _generate(llm, batch)
    assert len(default[0].prompt_token_ids) > len(per_prompt[0].prompt_token_ids)
    ref.kwargs = kwargs
    try:
        compare_with_reference(ref, batch[0][0], batch[0][1], per_prompt[0], ATOL)
    finally:
        ref.kwargs = {}


def test_vllm_example_engine_args(family, images) -> None:
    """vLLM's example: EngineArgs with engine-wide mm_processor_kwargs, the raw prompt form."""
    name, path, ref = family
    side = FAMILIES[name][3]
    kwargs = {"size": {"longest_edge": 2 * side}}
    engine_args = EngineArgs(
        model=path,
        max_model_len=8192,
        max_num_seqs=16,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2},
        mm_processor_kwargs=kwargs,
        dtype="float32",
        device="cpu",
    )
    llm = LLM(**asdict(engine_args))
    group = [images[2], images[3]]
    prompt = _example_prompt(name, len(group))
    (output,) = _generate(llm, [(prompt, group)])
    ref.kwargs = kwargs
    try:
        compare_with_reference(ref, prompt, group, output, ATOL)
    finally:
        ref.kwargs = {}


def test_hub_processor_files_load(family, images, tmp_path) -> None:
    """The hub layout of the processor files: preprocessor_config.json + a processor_config.json
    holding only image_seq_len."""
    import json
    import shutil

    name, path, _ = family
    folder = tmp_path / "hub"
    shutil.copytree(path, folder)
    nested = json.loads((folder / "processor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(nested.pop("image_processor")))
    (folder / "processor_config.json").write_text(json.dumps(nested))
    a = _processor(str(folder), name)
    b = _processor(path, name)
    assert a.settings == b.settings and a.image_seq_len == b.image_seq_len
    assert os.path.isfile(folder / "preprocessor_config.json")
