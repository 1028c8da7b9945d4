"""Pixtral (Llava with a Pixtral tower) and Mistral 3 against transformers 5.24, on tiny random
checkpoints: the processor (PixtralProcessor + PixtralImageProcessor, torchvision backend), the
model (PixtralVisionModel + projectors + Mistral decoder) and the engine end to end."""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import asdict

import pytest
import torch
from transformers import AutoConfig, AutoProcessor, CLIPVisionConfig

from tests.families.pixtral_checkpoint import (
    HF_CLASSES,
    IMG,
    IMG_BREAK,
    IMG_END,
    SETTINGS,
    build_model,
    build_pixtral_checkpoint,
    tiny_config,
)
from tests.family_helpers import checkpoint_model_config as model_config
from tests.family_helpers import engine_processor
from tests.hf_reference import TEST_DEVICE, TEST_DTYPE, HFReference, compare_with_reference
from vlmx import LLM, EngineArgs, SamplingParams
from vlmx.layers.attention import AttentionMetadata
from vlmx.models.loader import build_model as vlmx_build_model
from vlmx.models.pixtral import (
    LlavaPixtralForConditionalGeneration,
    Mistral3ForConditionalGeneration,
)
from vlmx.models.pixtral_processor import PixtralProcessor
from vlmx.multimodal import fetch_image

ARCHS = ("llava", "mistral3")
VLMX_CLASSES = {
    "llava": LlavaPixtralForConditionalGeneration,
    "mistral3": Mistral3ForConditionalGeneration,
}
QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
PIXEL_ATOL = 1e-5  # observed 0.0: the same torchvision ops in the same order
FEATURE_ATOL = 1e-4
LOGITS_ATOL = 1e-4
# (height, width): tiny, thin, exact multiples, odd, portrait / landscape, over longest_edge
SIZES = [
    (20, 30),
    (3, 150),
    (7, 7),
    (56, 56),
    (128, 128),
    (129, 127),
    (37, 91),
    (333, 517),
    (300, 200),
    (30, 900),
]


def structured_image(height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 [3, H, W]: gradients, a checkerboard and a little noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(-1, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, -1).expand(height, width)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    checker = ((rows // (3 + seed % 5) + cols // (3 + seed % 5)) % 2).float()
    noise = torch.rand(height, width, generator=gen)
    image = torch.stack([255 * y, 255 * x, 200 * checker + 55 * noise])
    return image.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, str], str]:
    root = tmp_path_factory.mktemp("pixtral")
    return {
        (arch, layout): build_pixtral_checkpoint(root / f"{arch}-{layout}", arch, layout)
        for arch in ARCHS
        for layout in ("transformers", "hub")
    }


_REFS: dict[tuple[str, str], HFReference] = {}


def reference(checkpoints, arch: str, layout: str = "transformers") -> HFReference:
    if (arch, layout) not in _REFS:
        _REFS[arch, layout] = HFReference(checkpoints[arch, layout], model_cls=HF_CLASSES[arch])
    return _REFS[arch, layout]


def processor(checkpoints, arch: str, layout: str = "transformers", **kwargs) -> PixtralProcessor:
    return engine_processor(PixtralProcessor, model_config(checkpoints[arch, layout], **kwargs))


def hf_crops(hf_out) -> list[torch.Tensor]:
    """HF's padded pixel_values [B, 3, H_max, W_max] cropped to each image's [3, h, w]."""
    sizes = hf_out["image_sizes"].tolist()
    return [pixels[:, :h, :w] for pixels, (h, w) in zip(hf_out["pixel_values"], sizes)]


def vlmx_prompt(tokenizer, num_images: int) -> tuple[str, list[int]]:
    """vLLM's pixtral_hf prompt form: one [IMG] per image."""
    prompt = f"<s>[INST]{QUESTION}\n" + "[IMG]" * num_images + "[/INST]"
    return prompt, tokenizer.encode(prompt)


# -- processor ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, layout, kwargs",
    [
        ("llava", "transformers", {}),
        ("mistral3", "transformers", {}),
        ("llava", "hub", {"size": {"longest_edge": 300}}),
        ("mistral3", "hub", {"longest_edge": 64}),
    ],
)
def test_pixels_and_prompt_ids_match_hf(checkpoints, arch, layout, kwargs):
    proc = processor(checkpoints, arch, layout)
    ref = AutoProcessor.from_pretrained(checkpoints[arch, layout])
    images = [structured_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    images.append(structured_image(333, 517, 99))  # same size as another: batched resize
    prompt, ids = vlmx_prompt(ref.tokenizer, len(images))
    out = proc.process(ids, images, kwargs)
    hf_kwargs = (
        {"size": {"longest_edge": kwargs["longest_edge"]}} if "longest_edge" in kwargs else kwargs
    )
    hf_out = ref(text=prompt, images=images, return_tensors="pt", **hf_kwargs)
    assert out.prompt_token_ids == hf_out["input_ids"][0].tolist()
    p = SETTINGS[arch][0]
    max_diff = 0.0
    for feature, pixels in zip(out.mm_features, hf_crops(hf_out), strict=True):
        h, w = feature.data["image_size"].tolist()
        assert [h, w] == list(pixels.shape[1:])
        expected = pixels.reshape(3, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)
        expected = expected.reshape((h // p) * (w // p), 3 * p * p)
        assert feature.data["pixel_values"].shape == expected.shape
        max_diff = max(max_diff, (feature.data["pixel_values"] - expected).abs().max().item())
        block = out.prompt_token_ids[feature.placeholder.offset : feature.placeholder.end]
        assert block == feature.data["token_ids"].tolist()
        assert (
            block[-1] == IMG_END
            and block.count(IMG) == feature.num_embeds - block.count(IMG_BREAK) - 1
        )
    assert max_diff <= PIXEL_ATOL


def test_engine_wide_kwargs_and_per_prompt_override(checkpoints):
    proc = processor(checkpoints, "mistral3", mm_processor_kwargs={"longest_edge": 56})
    ref = AutoProcessor.from_pretrained(checkpoints["mistral3", "transformers"])
    image = structured_image(333, 517, 0)
    prompt, ids = vlmx_prompt(ref.tokenizer, 1)
    for kwargs, hf_edge in (({}, 56), ({"longest_edge": 100}, 100)):
        out = proc.process(ids, [image], kwargs)
        hf_out = ref(text=prompt, images=[image], size={"longest_edge": hf_edge})
        assert out.prompt_token_ids == hf_out["input_ids"][0].tolist()
        assert proc.num_image_tokens(333, 517, kwargs) == out.mm_features[0].num_embeds


def test_expanded_prompts_are_kept(checkpoints):
    """Ids that HF's processor expanded are accepted as they are; short and expanded mix."""
    proc = processor(checkpoints, "llava")
    ref = AutoProcessor.from_pretrained(checkpoints["llava", "transformers"])
    images = [structured_image(50, 90, 0), structured_image(100, 40, 1)]
    prompt, ids = vlmx_prompt(ref.tokenizer, 2)
    expanded = ref(text=prompt, images=images)["input_ids"][0].tolist()
    short = proc.process(ids, images, {})
    full = proc.process(expanded, images, {})
    assert full.prompt_token_ids == short.prompt_token_ids == expanded
    assert [f.placeholder for f in full.mm_features] == [f.placeholder for f in short.mm_features]
    first = short.mm_features[0]
    mixed = ids[: ids.index(IMG)] + first.data["token_ids"].tolist() + ids[ids.index(IMG) + 1 :]
    assert proc.process(mixed, images, {}).prompt_token_ids == expanded
    # HF itself counts every [IMG] of an expanded text prompt as an image and refuses it.
    with pytest.raises(ValueError):
        ref(text=ref.tokenizer.decode(expanded), images=images)


def test_processor_errors(checkpoints):
    proc = processor(checkpoints, "llava")
    tok = AutoProcessor.from_pretrained(checkpoints["llava", "transformers"]).tokenizer
    images = [structured_image(50, 90, 0), structured_image(100, 40, 1)]
    _, ids = vlmx_prompt(tok, 2)
    with pytest.raises(ValueError, match=r"3 image placeholders \(\[IMG\]\) but 2 images"):
        proc.process(ids[:-1] + [IMG, ids[-1]], images, {})
    with pytest.raises(ValueError, match=r"1 image placeholders \(\[IMG\]\) but 2 images"):
        proc.process([t for t in ids if t != IMG] + [IMG], images, {})
    wrong = proc.process(ids, images[::-1], {}).mm_features[0].data["token_ids"].tolist()
    bad = ids[: ids.index(IMG)] + wrong + ids[ids.index(IMG) + 1 :]
    with pytest.raises(
        ValueError, match=r"but 2 images.*expanded block.*image 0: 5 rows of 8 \[IMG\]"
    ):
        proc.process(bad, images, {})
    with pytest.raises(ValueError, match=r"unknown mm_processor_kwargs \['max_pixels'\]"):
        proc.process(ids, images, {"max_pixels": 10})
    with pytest.raises(ValueError, match="longest_edge=0 must be a positive int"):
        proc.process(ids, images, {"longest_edge": 0})
    with pytest.raises(ValueError, match="size=\\{'height'"):
        proc.process(ids, images, {"size": {"height": 10, "width": 10}})
    with pytest.raises(ValueError, match="too elongated"):
        proc.process(ids[:-1], [structured_image(1, 900, 0)], {})


def test_pixel_values_in_model_dtype(checkpoints):
    path = checkpoints["llava", "transformers"]
    proc = engine_processor(PixtralProcessor, model_config(path, dtype=torch.bfloat16))
    ref = AutoProcessor.from_pretrained(path)
    image = structured_image(50, 70, 0)
    prompt, ids = vlmx_prompt(ref.tokenizer, 1)
    pixels = proc.process(ids, [image], {}).mm_features[0].data["pixel_values"]
    (crop,) = hf_crops(ref(text=prompt, images=[image]))
    p, (h, w) = SETTINGS["llava"][0], crop.shape[1:]
    expected = crop.reshape(3, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, 3 * p * p)
    assert pixels.dtype == torch.bfloat16
    assert torch.equal(pixels, expected.to(torch.bfloat16))


def test_processor_cache_by_content_and_settings(checkpoints):
    proc = processor(checkpoints, "llava")
    tok = AutoProcessor.from_pretrained(checkpoints["llava", "transformers"]).tokenizer
    image = structured_image(60, 80, 0)
    _, ids = vlmx_prompt(tok, 2)
    out = proc.process(ids, [image, image.clone()], {})
    a, b = out.mm_features
    assert a.mm_hash == b.mm_hash and a.data["pixel_values"] is b.data["pixel_values"]
    assert len(proc.cache) == 1
    again = proc.process(ids, [image, image], {"longest_edge": 32}).mm_features[0]
    assert again.mm_hash != a.mm_hash and len(proc.cache) == 2


def test_clip_llava_is_rejected(checkpoints, tmp_path):
    folder = tmp_path / "llava-clip"
    shutil.copytree(checkpoints["llava", "transformers"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"] = CLIPVisionConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1
    ).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only with a Pixtral vision tower.*llava-1.5"):
        LLM(model=str(folder), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="only with a Pixtral vision tower"):
        LlavaPixtralForConditionalGeneration(AutoConfig.from_pretrained(folder))


# -- model ----------------------------------------------------------------------------------


def _prefill(model, embeds: torch.Tensor) -> torch.Tensor:
    """One-shot prefill of one sequence through the paged decoder -> logits [T, vocab]."""
    num_tokens, block_size = embeds.shape[0], 16
    num_blocks = -(-num_tokens // block_size)
    shape = (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    kv_caches = [torch.full(shape, float("nan")) for _ in range(model.num_layers)]
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        block_tables=torch.arange(num_blocks, dtype=torch.int32).view(1, -1),
        slot_mapping=torch.arange(num_tokens),
        query_start_loc_cpu=[0, num_tokens],
        seq_lens_cpu=[num_tokens],
        block_size=block_size,
    )
    hidden = model(embeds, torch.arange(num_tokens), kv_caches, metadata)
    return model.compute_logits(hidden)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["transformers", "hub"])
def test_image_features_and_prefill_logits_match_hf(checkpoints, arch, layout):
    path = checkpoints[arch, layout]
    ref = reference(checkpoints, arch, layout)
    config = model_config(path)
    model = vlmx_build_model(config.architecture, config.hf_config, path, "cpu", torch.float32)
    if arch == "mistral3":  # tied by config; the hub layout ships an lm_head of its own
        assert (model.lm_head is None) == (layout == "transformers")
    proc = engine_processor(PixtralProcessor, config)
    images = [structured_image(h, w, s) for s, (h, w) in enumerate([(90, 60), (40, 130), (77, 77)])]
    prompt, ids = vlmx_prompt(ref.processor.tokenizer, 3)
    processed = proc.process(ids, images, {})
    hf_in = ref.inputs(prompt, images)
    assert processed.prompt_token_ids == hf_in["input_ids"][0].tolist()

    blocks = model.encode_images(processed.mm_features)  # one batched call for all three
    hf_features = ref.model.get_image_features(
        pixel_values=hf_in["pixel_values"], image_sizes=hf_in["image_sizes"]
    ).pooler_output
    embed = model.embed_tokens
    for feature, block, hf_feat in zip(processed.mm_features, blocks, hf_features, strict=True):
        ids_t = feature.data["token_ids"]
        assert block.shape == (feature.num_embeds, model.config.hidden_size)
        assert (block[ids_t == IMG] - hf_feat).abs().max().item() < FEATURE_ATOL
        assert torch.equal(block[ids_t != IMG], embed(ids_t[ids_t != IMG]))

    embeds = model.embed_tokens(torch.tensor(processed.prompt_token_ids))
    for feature, block in zip(processed.mm_features, blocks):
        embeds[feature.placeholder.offset : feature.placeholder.end] = block
    logits = _prefill(model, embeds)
    hf_logits = ref.model(**hf_in).logits[0]
    assert (logits - hf_logits).abs().max().item() < LOGITS_ATOL


@torch.no_grad()
@pytest.mark.parametrize(
    "arch, feature_layer", [("llava", -2), ("llava", [0, -1]), ("mistral3", 1), ("mistral3", -3)]
)
def test_vision_feature_layers_match_hf(arch, feature_layer):
    """Hidden-state selection (0 = after ln_pre, i = after layer i), as HF's output capture."""
    config = tiny_config(arch)
    config.vision_feature_layer = feature_layer
    torch.manual_seed(1)
    hf = HF_CLASSES[arch](config).eval()
    ours = VLMX_CLASSES[arch](config)
    ours.load_weights(hf.state_dict().items())
    p, m = config.vision_config.patch_size, getattr(config, "spatial_merge_size", 1)
    sizes = [(4 * p * m, 2 * p * m), (2 * p * m, 6 * p * m)]
    pixels = torch.randn(2, 3, 4 * p * m, 6 * p * m)
    hf_feats = hf.get_image_features(pixel_values=pixels, image_sizes=torch.tensor(sizes))
    for (h, w), image, hf_feat in zip(sizes, pixels, hf_feats.pooler_output):
        patches = image[:, :h, :w].reshape(3, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)
        states = ours.vision_tower(
            patches.reshape(-1, 3 * p * p), [(h // p, w // p)], ours.feature_layers
        )
        feats = ours.project(states, [(h // p, w // p)])
        assert (feats - hf_feat).abs().max().item() < FEATURE_ATOL


def test_load_weights_rejects_missing_unexpected_and_misshapen(checkpoints):
    config = tiny_config("mistral3")
    config.tie_word_embeddings = False
    weights = dict(build_model("mistral3").state_dict())
    weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"] * 2
    dropped = "model.vision_tower.transformer.layers.1.attention.k_proj.weight"
    with pytest.raises(
        ValueError, match=r"missing 1 weight.*attention\.qkv_proj\.weight \(part 1\)"
    ):
        Mistral3ForConditionalGeneration(config).load_weights(
            (k, v) for k, v in weights.items() if k != dropped
        )
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.vision_tower\.extra\.weight'"):
        Mistral3ForConditionalGeneration(config).load_weights(
            [*weights.items(), ("model.vision_tower.extra.weight", torch.zeros(2))]
        )
    weights["model.multi_modal_projector.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        Mistral3ForConditionalGeneration(config).load_weights(weights.items())


def test_unsupported_configs_are_refused():
    config = tiny_config("llava")
    config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        LlavaPixtralForConditionalGeneration(config)


def test_mistral_sliding_window_slides_every_decoder_layer():
    config = tiny_config("mistral3")
    config.text_config.sliding_window = 4096
    model = Mistral3ForConditionalGeneration(config)
    windows = [layer.self_attn.attn.sliding_window for layer in model.language_model.layers]
    assert windows == [4096] * config.text_config.num_hidden_layers


# -- engine end to end ----------------------------------------------------------------------


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 2048)
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, **kwargs)


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _generate(llm: LLM, batch, params=GREEDY):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in batch]
    return llm.generate(prompts, params, use_tqdm=False)


def _same(outputs, baseline) -> None:
    for out, base in zip(outputs, baseline, strict=True):
        assert out.prompt_token_ids == base.prompt_token_ids
        assert out.outputs[0].token_ids == base.outputs[0].token_ids
        for a, b in zip(out.outputs[0].logprobs, base.outputs[0].logprobs):
            for token_id in b:
                assert abs(a[token_id].logprob - b[token_id].logprob) < 2e-3


@pytest.fixture(scope="module", params=ARCHS)
def engine_setup(request, checkpoints, test_images):
    arch = request.param
    path = checkpoints[arch, "transformers"]
    ref = reference(checkpoints, arch)
    example = vlmx_prompt(ref.processor.tokenizer, 2)[0]
    example3 = vlmx_prompt(ref.processor.tokenizer, 3)[0]
    batch = [  # vLLM's example form with 2 and 3 images, and the chat template's form
        (example, test_images[1:3]),
        (example3, test_images[2:5]),
        (ref.chat_prompt(2, QUESTION), [test_images[0], test_images[3]]),
    ]
    return arch, path, ref, batch, _llm(path)


def test_generate_and_chat_match_reference(engine_setup):
    _, _, ref, batch, llm = engine_setup
    outputs = _generate(llm, batch)
    for (prompt, images), output in zip(batch, outputs):
        assert len(output.outputs[0].token_ids) == 6
        compare_with_reference(ref, prompt, images, output)

    conversations = []
    for _, images in batch[:2]:
        content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]
        content.append({"type": "text", "text": QUESTION})
        conversations.append([{"role": "user", "content": content}])
    system = [{"role": "system", "content": "Be brief."}]
    conversations.append(system + conversations[0])
    chat_outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    chat_prompts = [ref.chat_prompt(len(images), QUESTION) for _, images in batch[:2]]
    chat_prompts.append(
        ref.processor.apply_chat_template(system + [conversations[0][0]], tokenize=False)
    )
    images = [batch[0][1], batch[1][1], batch[0][1]]
    for prompt, imgs, output in zip(chat_prompts, images, chat_outputs, strict=True):
        compare_with_reference(ref, prompt, imgs, output)


def test_hub_layout_matches_reference(checkpoints, engine_setup):
    arch, _, _, batch, _ = engine_setup
    ref = reference(checkpoints, arch, "hub")
    for (prompt, images), output in zip(batch, _generate(_llm(checkpoints[arch, "hub"]), batch)):
        compare_with_reference(ref, prompt, images, output)


def test_expanded_prompt_token_ids_match(engine_setup):
    _, _, ref, batch, llm = engine_setup
    prompt, images = batch[1]
    ids = ref.inputs(prompt, images)["input_ids"][0].tolist()
    (out,) = llm.generate(
        [{"prompt_token_ids": ids, "multi_modal_data": {"image": images}}], GREEDY, use_tqdm=False
    )
    _same([out], _generate(llm, [batch[1]]))


def test_prefix_caching_and_chunked_prefill(engine_setup):
    _, path, _, batch, llm = engine_setup
    baseline = _generate(llm, batch)
    cached = _llm(path, enable_prefix_caching=True)
    _same(_generate(cached, batch), baseline)
    second = _generate(cached, batch)
    _same(second, baseline)
    assert all(o.num_cached_tokens > 0 for o in second)

    blocks = [f for o in baseline for f in o.prompt_token_ids if f == IMG_END]
    image_tokens = [o.prompt_token_ids.count(IMG) for o in baseline]
    assert len(blocks) == 7 and min(image_tokens) > 24
    chunked = _llm(path, max_num_batched_tokens=24, max_num_seqs=4, enable_prefix_caching=False)
    _same(_generate(chunked, batch), baseline)


def test_swapping_images_changes_logprobs(engine_setup):
    _, _, _, batch, llm = engine_setup
    prompt, (a, b) = batch[0]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = _generate(llm, [(prompt, [a, b]), (prompt, [b, a])], params)
    first, second = ({t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in out)
    assert set(first) != set(second) or max(abs(first[t] - second[t]) for t in first) > 1e-3


# -- vLLM's offline multi-image example (load_pixtral_hf / load_mistral3) ---------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_example_form(checkpoints, arch, test_images):
    """The example's EngineArgs and prompt, with tensor_parallel_size=1 (2 raises clearly)."""
    path = checkpoints[arch, "hub"]
    ref = reference(checkpoints, arch, "hub")
    urls = [_data_url(im) for im in test_images[3:5]]
    engine_args = EngineArgs(
        model=path,
        max_model_len=8192,
        max_num_seqs=2,
        tensor_parallel_size=2,
        limit_mm_per_prompt={"image": len(urls)},
    )
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(**asdict(engine_args))
    llm = LLM(**(asdict(engine_args) | {"tensor_parallel_size": 1, "device": "cpu"}))
    prompt = f"<s>[INST]{QUESTION}\n{'[IMG]' * len(urls)}[/INST]"
    images = [fetch_image(url) for url in urls]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    (out,) = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, params)
    assert len(out.outputs[0].token_ids) == 16
    compare_with_reference(ref, prompt, images, out)
    content = [{"type": "text", "text": QUESTION}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    (chat,) = llm.chat([{"role": "user", "content": content}], params)
    chat_prompt = ref.processor.apply_chat_template(
        [{"role": "user", "content": [content[0], {"type": "image"}, {"type": "image"}]}],
        tokenize=False,
    )
    assert chat.prompt == chat_prompt
    compare_with_reference(ref, chat_prompt, images, chat)
