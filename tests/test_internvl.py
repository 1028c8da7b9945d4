"""InternVL (transformers-native checkpoints) against transformers 5.24, on tiny random checkpoints.

- processor: `InternVLProcessor` + `GotOcr2ImageProcessor` (torchvision) for tiles, pixels and
  the `<img>` + `<IMG_CONTEXT>` x N + `</img>` expansion, over many sizes and the
  mm_processor_kwargs (vLLM's and HF's names);
- model: `InternVLModel.get_image_features` and the prefill logits of
  `InternVLForConditionalGeneration`, for both checkpoint naming schemes and tower variants;
- engine: `LLM.generate` / `LLM.chat` against the HF model (teacher-forced logprobs + greedy),
  with prefix caching, chunked prefill and swapped images.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoProcessor
from transformers import InternVLForConditionalGeneration as HFInternVL
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from tests.families.internvl_checkpoint import (
    IMAGE_SEQ_LENGTH,
    IMG_CONTEXT_ID,
    IMG_END_ID,
    IMG_START_ID,
    TILE_SIZE,
    TOKEN_IDS,
    build_internvl_checkpoint,
    tiny_internvl_config,
)
from tests.family_helpers import (
    assert_same_outputs,
    assert_swap_changes_logprobs,
    check_generate_and_chat,
    engine_processor,
    image_tensor,
)
from tests.family_helpers import checkpoint_model_config as model_config
from tests.hf_reference import TEST_DEVICE, TEST_DTYPE, HFReference, compare_with_reference
from vlmx import LLM, SamplingParams
from vlmx.demo.checkpoint import randomize_zero_params
from vlmx.demo.images import structured_image
from vlmx.layers.attention import AttentionMetadata
from vlmx.models.internvl import InternVLForConditionalGeneration
from vlmx.models.internvl_processor import InternVLProcessor, tile_grid
from vlmx.models.loader import iterate_weights
from vlmx.multimodal.inputs import MMFeature, PlaceholderRange

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
PIXEL_ATOL = 1e-5  # observed: 0.0 (same torchvision ops on the CPU)
FEATURE_ATOL = 1e-4
LOGITS_ATOL = 1e-4
# (height, width): tiny, square, wide, tall, odd, extreme aspect, large
SIZES = [(20, 30), (1, 150), (112, 112), (224, 224), (37, 91), (333, 517), (300, 400), (96, 64),
         (30, 900), (700, 25), (1024, 768)]  # fmt: skip
# (vLLM / HF names as a user passes them, the same in HF's names)
KWARGS = [
    ({}, {}),
    ({"max_dynamic_patch": 4}, {"max_patches": 4}),
    ({"max_patches": 6, "min_patches": 2}, {"max_patches": 6, "min_patches": 2}),
    ({"min_dynamic_patch": 3, "max_dynamic_patch": 8}, {"min_patches": 3, "max_patches": 8}),
    ({"max_dynamic_patch": 1}, {"max_patches": 1}),
    ({"crop_to_patches": False}, {"crop_to_patches": False}),
    ({"dynamic_image_size": False}, {"crop_to_patches": False}),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return build_internvl_checkpoint(tmp_path_factory.mktemp("internvl"), "transformers")


@pytest.fixture(scope="module")
def hf_processor(ckpt):
    return AutoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def tok(hf_processor):
    return hf_processor.tokenizer


@pytest.fixture(scope="module")
def hub_ckpt(tmp_path_factory) -> str:
    return build_internvl_checkpoint(tmp_path_factory.mktemp("internvl-hub"), "hub")


@pytest.fixture(scope="module")
def ref(ckpt) -> HFReference:
    return HFReference(ckpt, model_cls=HFInternVL)


def prompt_text(num_images: int) -> str:
    """A prompt as the chat template writes it: one <IMG_CONTEXT> per image."""
    images = "".join(f"Image {i + 1}: <IMG_CONTEXT>\n" for i in range(num_images))
    return f"<|im_start|>user\n{images}Describe.<|im_end|>\n<|im_start|>assistant\n"


def prompt_ids(tok, num_images: int) -> list[int]:
    return tok(prompt_text(num_images))["input_ids"]


# ---------------------------------------------------------------------------------------------
# Processor


def test_tile_grid_matches_hf() -> None:
    for height, width in SIZES + [(448, 448), (100, 300), (300, 100), (50, 50), (1, 1)]:
        for lo, hi in [(1, 12), (1, 6), (2, 4), (3, 8), (1, 1), (4, 40)]:
            ours = tile_grid(height, width, TILE_SIZE, lo, hi)
            theirs = get_optimal_tiled_canvas((height, width), (TILE_SIZE, TILE_SIZE), lo, hi)
            assert ours == tuple(theirs), (height, width, lo, hi)


@pytest.mark.parametrize("ours_kwargs,hf_kwargs", KWARGS)
def test_processor_matches_hf(ckpt, tok, hf_processor, ours_kwargs, hf_kwargs) -> None:
    hf = hf_processor
    processor = engine_processor(InternVLProcessor, model_config(ckpt))
    images = [image_tensor(h, w, i) for i, (h, w) in enumerate(SIZES)]
    text = prompt_text(len(images))
    hf_out = hf(text=[text], images=images, return_tensors="pt", **hf_kwargs)
    out = processor.process(prompt_ids(tok, len(images)), images, ours_kwargs)

    assert out.prompt_token_ids == hf_out["input_ids"][0].tolist()
    hf_pixels = hf_out["pixel_values"]
    ours = torch.cat([f.data["pixel_values"] for f in out.mm_features])
    assert ours.shape == hf_pixels.shape
    assert (ours - hf_pixels).abs().max().item() <= PIXEL_ATOL
    for image, feature in zip(images, out.mm_features, strict=True):
        p = feature.placeholder  # the <IMG_CONTEXT> run inside <img> ... </img>
        assert out.prompt_token_ids[p.offset - 1] == IMG_START_ID
        assert out.prompt_token_ids[p.end] == IMG_END_ID
        assert set(out.prompt_token_ids[p.offset : p.end]) == {IMG_CONTEXT_ID}
        assert p.length == feature.data["pixel_values"].shape[0] * IMAGE_SEQ_LENGTH
        assert processor.num_image_tokens(*image.shape[-2:], ours_kwargs) == p.length


def test_engine_wide_kwargs_and_per_prompt_override(ckpt, tok, hf_processor) -> None:
    hf = hf_processor
    processor = engine_processor(InternVLProcessor, model_config(ckpt, {"max_dynamic_patch": 4}))
    image = image_tensor(300, 400, 3)
    for ours_kwargs, hf_kwargs in [
        ({}, {"max_patches": 4}),
        ({"max_patches": 2}, {"max_patches": 2}),
    ]:
        out = processor.process(prompt_ids(tok, 1), [image], ours_kwargs)
        text = prompt_text(1)
        hf_out = hf(text=[text], images=[image], **hf_kwargs)
        assert out.prompt_token_ids == hf_out["input_ids"][0]
        assert out.mm_features[0].data["pixel_values"].shape[0] == len(hf_out["pixel_values"])


def test_expanded_prompt_is_kept_and_cache_is_used(ckpt, tok, hf_processor) -> None:
    hf = hf_processor
    processor = engine_processor(InternVLProcessor, model_config(ckpt))
    images = [image_tensor(224, 224, 0), image_tensor(150, 330, 2)]
    text = prompt_text(2)
    hf_ids = hf(text=[text], images=images)["input_ids"][0]
    first = processor.process(prompt_ids(tok, 2), images, {})
    again = processor.process(hf_ids, images, {})  # already expanded, as HF's processor gives it
    assert again.prompt_token_ids == hf_ids == first.prompt_token_ids
    assert [f.placeholder for f in again.mm_features] == [f.placeholder for f in first.mm_features]
    for a, b in zip(first.mm_features, again.mm_features):
        assert a.mm_hash == b.mm_hash
        assert a.data["pixel_values"] is b.data["pixel_values"]  # from the processor's cache
    other = processor.process(prompt_ids(tok, 1), images[:1], {"max_dynamic_patch": 2})
    assert other.mm_features[0].mm_hash != first.mm_features[0].mm_hash


def test_processor_errors(ckpt, tok) -> None:
    processor = engine_processor(InternVLProcessor, model_config(ckpt))
    image = image_tensor(64, 96, 4)
    with pytest.raises(ValueError, match=r"2 image placeholders \(<IMG_CONTEXT>\) but 1 images"):
        processor.process(prompt_ids(tok, 2), [image], {})
    with pytest.raises(ValueError, match="0 image placeholders"):
        processor.process([1, 2, 3], [image], {})
    with pytest.raises(ValueError, match=r"unknown mm_processor_kwargs \['max_pixels'\].*"):
        processor.process(prompt_ids(tok, 1), [image], {"max_pixels": 10})
    with pytest.raises(ValueError, match="max_dynamic_patch=0 must be a positive int"):
        processor.process(prompt_ids(tok, 1), [image], {"max_dynamic_patch": 0})
    with pytest.raises(ValueError, match="min_patches=5 is larger than max_patches=2"):
        processor.process(prompt_ids(tok, 1), [image], {"min_patches": 5, "max_patches": 2})
    with pytest.raises(ValueError, match="max_patches twice"):
        processor.process(prompt_ids(tok, 1), [image], {"max_patches": 5, "max_dynamic_patch": 2})
    with pytest.raises(ValueError, match="crop_to_patches=1 must be True or False"):
        processor.process(prompt_ids(tok, 1), [image], {"crop_to_patches": 1})
    with pytest.raises(ValueError, match="video placeholders"):
        processor.process(prompt_ids(tok, 1) + [TOKEN_IDS["<video>"]], [image], {})
    with pytest.raises(ValueError, match="run of 3"):
        processor.process([5, IMG_CONTEXT_ID, IMG_CONTEXT_ID, IMG_CONTEXT_ID, 6], [image], {})
    with pytest.raises(ValueError, match="unknown mm_processor_kwargs"):
        engine_processor(InternVLProcessor, model_config(ckpt, {"max_num": 3}))


# ---------------------------------------------------------------------------------------------
# Model


def _hf_model(config) -> HFInternVL:
    torch.manual_seed(1)
    model = HFInternVL(config).eval()
    randomize_zero_params(model, 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lambda_" in name:
                param.uniform_(0.5, 1.5)
    return model


def _prefill(model, ids: list[int], features) -> torch.Tensor:
    """One-shot prefill of one sequence through the paged decoder -> logits [L, vocab]."""
    block_size, num_blocks = 16, -(-len(ids) // 16) + 1
    kv_caches = [
        torch.full((2, num_blocks, block_size, model.num_kv_heads, model.head_dim), float("nan"))
        for _ in range(model.num_layers)
    ]
    blocks = list(range(num_blocks - 1, -1, -1))  # scrambled block order
    slots = [blocks[i // block_size] * block_size + i % block_size for i in range(len(ids))]
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor([0, len(ids)], dtype=torch.int32),
        seq_lens=torch.tensor([len(ids)], dtype=torch.int32),
        block_tables=torch.tensor([blocks], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=[0, len(ids)],
        seq_lens_cpu=[len(ids)],
        block_size=block_size,
    )
    embeds = model.embed_tokens(torch.tensor(ids))
    for feature, image_embeds in zip(features, model.encode_images(features)):
        embeds[feature.placeholder.offset : feature.placeholder.end] = image_embeds
    hidden = model(embeds, torch.arange(len(ids)), kv_caches, metadata)
    return model.compute_logits(hidden)


def _ours(path: str) -> InternVLForConditionalGeneration:
    model = InternVLForConditionalGeneration(AutoConfig.from_pretrained(path))
    model.load_weights(iterate_weights(path))
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("layout", ["transformers", "hub"])
def test_image_features_and_prefill_match_hf(ckpt, tok, hub_ckpt, ref, layout) -> None:
    model = _ours(ckpt if layout == "transformers" else hub_ckpt)
    processor = engine_processor(InternVLProcessor, model_config(ckpt))
    images = [image_tensor(300, 400, 3), image_tensor(96, 64, 4), image_tensor(224, 224, 0)]
    out = processor.process(prompt_ids(tok, 3), images, {})
    pixel_values = torch.cat([f.data["pixel_values"] for f in out.mm_features])
    hf_features = ref.model.get_image_features(pixel_values=pixel_values).pooler_output
    ours = model.encode_images(out.mm_features)
    assert torch.cat(ours).shape == hf_features.flatten(0, 1).shape
    assert (torch.cat(ours) - hf_features.flatten(0, 1)).abs().max().item() < FEATURE_ATOL

    ids = out.prompt_token_ids
    hf_logits = ref.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0]
    logits = _prefill(model, ids, out.mm_features)
    assert (logits - hf_logits).abs().max().item() < LOGITS_ATOL


@torch.no_grad()
@pytest.mark.parametrize(
    "vision,top",
    [
        ({"use_qk_norm": True, "norm_type": "rms_norm", "attention_bias": False}, {}),
        ({"use_mean_pooling": False}, {"vision_feature_layer": -2}),
        ({"use_mean_pooling": False}, {"vision_feature_layer": 1}),
    ],
)
def test_tower_variants_match_hf(vision, top) -> None:
    config = tiny_internvl_config(**vision)
    for key, value in top.items():
        setattr(config, key, value)
    hf = _hf_model(config)
    model = InternVLForConditionalGeneration(config)
    model.load_weights(hf.state_dict().items())  # the module names: model.vision_tower.* ...
    pixel_values = torch.randn(3, 3, TILE_SIZE, TILE_SIZE)
    hf_features = hf.model.get_image_features(pixel_values=pixel_values).pooler_output
    features = [
        MMFeature(
            "a", PlaceholderRange(0, 2 * IMAGE_SEQ_LENGTH), {"pixel_values": pixel_values[:2]}
        ),
        MMFeature("b", PlaceholderRange(0, IMAGE_SEQ_LENGTH), {"pixel_values": pixel_values[2:]}),
    ]
    ours = torch.cat(model.encode_images(features))
    assert (ours - hf_features.flatten(0, 1)).abs().max().item() < FEATURE_ATOL


def test_load_weights_rejects_missing_and_unexpected(ckpt) -> None:
    config = AutoConfig.from_pretrained(ckpt)
    weights = list(iterate_weights(ckpt))
    missing = [(n, t) for n, t in weights if "encoder.layer.1.lambda_2" not in n]
    with pytest.raises(ValueError, match="missing 1 weight"):
        InternVLForConditionalGeneration(config).load_weights(missing)
    with pytest.raises(ValueError, match="unexpected weight 'vision_tower.extra'"):
        InternVLForConditionalGeneration(config).load_weights(
            weights + [("vision_tower.extra", torch.zeros(1))]
        )
    no_head = [(n, t) for n, t in weights if "lm_head" not in n]
    with pytest.raises(ValueError, match="missing lm_head.weight"):
        InternVLForConditionalGeneration(config).load_weights(no_head)
    config.tie_word_embeddings = True  # a tied checkpoint: lm_head is the embedding matrix
    model = InternVLForConditionalGeneration(config)
    model.load_weights(no_head)
    assert model.lm_head.weight is model.language_model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------
# Engine


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 2048)
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, **kwargs)


def _generate(llm: LLM, batch, params=GREEDY, **extra):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}, **extra} for p, imgs in batch]
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def batch(ref, test_images):
    """Prompts with 2 and 3 images of different sizes and aspect ratios (chat-template form)."""
    groups = [test_images[1:3], test_images[2:5]]
    return [(ref.chat_prompt(len(g), QUESTION), g) for g in groups]


def test_generate_and_chat_match_reference(ckpt, ref, batch) -> None:
    llm = _llm(ckpt)
    gen = _generate(llm, batch)
    check_generate_and_chat(llm, ref, batch, gen, QUESTION, GREEDY)


def test_hub_layout_and_tile_kwargs_match_reference(hub_ckpt, batch) -> None:
    ref = HFReference(hub_ckpt, model_cls=HFInternVL)
    llm = _llm(hub_ckpt)
    outputs = _generate(llm, batch, mm_processor_kwargs={"max_dynamic_patch": 2})
    ref_inputs = ref.inputs
    ref.inputs = lambda prompt, images: ref.processor(
        text=[prompt], images=images, return_tensors="pt", max_patches=2
    )
    try:
        for (prompt, images), output in zip(batch, outputs):
            compare_with_reference(ref, prompt, images, output)
    finally:
        ref.inputs = ref_inputs
    full = _generate(llm, batch[:1])  # without the kwarg: more tiles, a longer prompt
    assert len(full[0].prompt_token_ids) > len(outputs[0].prompt_token_ids)


def test_prefix_caching_and_chunked_prefill(ckpt, batch) -> None:
    baseline = _generate(_llm(ckpt, enable_prefix_caching=False), batch)

    def check(outputs):
        assert_same_outputs(outputs, baseline, 2e-3)

    llm = _llm(ckpt, enable_prefix_caching=True)
    check(_generate(llm, batch))
    second = _generate(llm, batch)
    check(second)
    assert all(o.num_cached_tokens > 0 for o in second)

    image_tokens = [o.prompt_token_ids.count(IMG_CONTEXT_ID) for o in baseline]
    assert min(image_tokens) > 32  # chunks end inside image spans
    chunked = _llm(ckpt, max_num_batched_tokens=32, max_num_seqs=2, enable_prefix_caching=False)
    check(_generate(chunked, batch))


def test_swapping_images_changes_logprobs(ckpt, ref) -> None:
    prompt = ref.chat_prompt(2, QUESTION)
    a, b = structured_image(224, 168, 0), structured_image(224, 168, 5)  # same tiles, other pixels
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = _generate(_llm(ckpt), [(prompt, [a, b]), (prompt, [b, a])], params)
    assert_swap_changes_logprobs(*out)
