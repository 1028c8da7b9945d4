"""Qwen3-VL against transformers 5.25, on a tiny random checkpoint.

- processor: Qwen2-VL's rules over the checkpoint's `Qwen2VLImageProcessor` settings (patch 16,
  mean / std 0.5): pixel values, grids, `<|image_pad|>` counts and M-RoPE positions against HF's
  `Qwen3VLProcessor` and `get_rope_index`, over many sizes and min / max_pixels;
- layers: interleaved M-RoPE against `Qwen3VLTextRotaryEmbedding`, the tower (main and DeepStack
  features) against `get_image_features`, the prefill logits against the HF model;
- engine: `LLM.generate` / `LLM.chat` with 2 and 3 images, prefix caching and chunked prefill
  against the HF model (teacher-forced logprobs + greedy), swapped images, refused options;
- the `qwen3-vl-8b` bench preset: its parameter count against the published 8.77B (meta device).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoProcessor
from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from tests.families.qwen3_vl_checkpoint import (
    IMAGE_TOKEN_ID,
    MAX_PIXELS,
    TOKEN_IDS,
    VIDEO_TOKEN_ID,
    build_qwen3_vl_checkpoint,
    tiny_qwen3_vl_config,
)
from tests.family_helpers import (
    assert_swap_changes_logprobs,
    check_generate_and_chat,
    engine_processor,
    image_tensor,
)
from tests.family_helpers import checkpoint_model_config as model_config
from tests.hf_reference import TEST_DEVICE, TEST_DTYPE, HFReference, compare_with_reference
from vlmx import LLM, SamplingParams
from vlmx.demo.images import structured_image
from vlmx.layers.attention import AttentionMetadata
from vlmx.layers.rotary import RotaryEmbedding
from vlmx.models.loader import iterate_weights
from vlmx.models.qwen3_vl import Qwen2VLProcessor, Qwen3VLForConditionalGeneration

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
# (height, width): tiny, square, wide, tall, odd, extreme aspect, large
SIZES = [(20, 30), (64, 64), (160, 320), (330, 150), (37, 91), (30, 900), (700, 25), (768, 1024)]
KWARGS = [{}, {"max_pixels": 32 * 32 * 16}, {"min_pixels": 32 * 32 * 30, "max_pixels": MAX_PIXELS}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return build_qwen3_vl_checkpoint(tmp_path_factory.mktemp("qwen3_vl"))


@pytest.fixture(scope="module")
def ref(ckpt) -> HFReference:
    return HFReference(ckpt, model_cls=HFQwen3VL)


def new_processor(path: str, device: str = "cpu") -> Qwen2VLProcessor:
    """The processor as the engine builds it: the checkpoint's tokenizer, images on `device`."""
    return engine_processor(Qwen2VLProcessor, model_config(path), device)


def prompt_text(num_images: int) -> str:
    images = "".join("<|vision_start|><|image_pad|><|vision_end|>" for _ in range(num_images))
    return f"<|im_start|>user\n{images}Describe.<|im_end|>\n<|im_start|>assistant\n"


def _token_types(fn, input_ids: torch.Tensor) -> dict:
    """`mm_token_type_ids` (1 at image tokens) where `fn` takes them (transformers 5.25 does)."""
    if "mm_token_type_ids" not in inspect.signature(fn).parameters:
        return {}
    return {"mm_token_type_ids": (input_ids == IMAGE_TOKEN_ID).int()}


# ---------------------------------------------------------------------------------------------
# Processor


@pytest.mark.parametrize("kwargs", KWARGS)
def test_processor_matches_hf(ckpt, ref, kwargs) -> None:
    processor = new_processor(ckpt, TEST_DEVICE)  # on the model's device: equal on any
    hf = AutoProcessor.from_pretrained(ckpt)
    for start in range(0, len(SIZES), 3):
        sizes = SIZES[start : start + 3]
        images = [image_tensor(h, w, i) for i, (h, w) in enumerate(sizes)]
        text = prompt_text(len(images))
        ids = hf.tokenizer(text)["input_ids"]
        out = processor.process(ids, images, kwargs)
        pil = [structured_image(w, h, i) for i, (h, w) in enumerate(sizes)]
        expected = hf(text=[text], images=pil, return_tensors="pt", **kwargs)
        assert out.prompt_token_ids == expected["input_ids"][0].tolist()
        pixels = torch.cat([f.data["pixel_values"].float().cpu() for f in out.mm_features])
        torch.testing.assert_close(pixels, expected["pixel_values"], atol=1e-5, rtol=0)
        grids = torch.stack([f.data["image_grid_thw"] for f in out.mm_features])
        assert torch.equal(grids, expected["image_grid_thw"])
        positions, delta = ref.model.model.get_rope_index(
            input_ids=expected["input_ids"],
            image_grid_thw=expected["image_grid_thw"],
            **_token_types(ref.model.model.get_rope_index, expected["input_ids"]),
        )
        assert torch.equal(out.mrope_positions, positions[:, 0])
        assert out.mrope_position_delta == delta.item()


def test_processor_refuses_video_and_bad_kwargs(ckpt) -> None:
    processor = new_processor(ckpt)
    image = image_tensor(64, 64, 0)
    with pytest.raises(ValueError, match="video placeholders"):
        processor.process([TOKEN_IDS["<|im_start|>"], VIDEO_TOKEN_ID], [], {})
    with pytest.raises(ValueError, match="min_pixels"):
        processor.process([IMAGE_TOKEN_ID], [image], {"min_pixels": 10**9})
    with pytest.raises(ValueError, match="fps"):
        processor.process([IMAGE_TOKEN_ID], [image], {"fps": 2})


# ---------------------------------------------------------------------------------------------
# Layers and model


def test_interleaved_mrope_matches_hf() -> None:
    text = tiny_qwen3_vl_config().text_config
    hf = Qwen3VLTextRotaryEmbedding(text)
    positions = torch.stack([torch.arange(40), torch.arange(40) % 7 + 3, torch.arange(40) // 5])
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions[:, None])
    ours = RotaryEmbedding(16, 5000000.0, [4, 2, 2], mrope_interleaved=True)
    cos, sin = ours(positions)
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-6, rtol=0)
    plain_cos, _ = RotaryEmbedding(16, 5000000.0, [4, 2, 2])(positions)
    assert not torch.allclose(plain_cos, cos)  # the layouts differ


def _ours(path: str) -> Qwen3VLForConditionalGeneration:
    model = Qwen3VLForConditionalGeneration(AutoConfig.from_pretrained(path))
    model.load_weights(iterate_weights(path))
    return model.eval()


def _prefill_inputs(model, ids: list[int], features):
    """The embeddings, metadata and (NaN) KV caches of a one-shot prefill of `ids`."""
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
    return embeds, metadata, kv_caches


@torch.no_grad()
def test_image_features_and_prefill_match_hf(ckpt, ref) -> None:
    model = _ours(ckpt)
    processor = new_processor(ckpt)
    hf = AutoProcessor.from_pretrained(ckpt)
    images = [image_tensor(300, 400, 3), image_tensor(96, 64, 4), image_tensor(224, 224, 0)]
    text = prompt_text(3)
    out = processor.process(hf.tokenizer(text)["input_ids"], images, {})
    pixel_values = torch.cat([f.data["pixel_values"] for f in out.mm_features])
    grids = torch.stack([f.data["image_grid_thw"] for f in out.mm_features])
    hf_out = ref.model.model.get_image_features(pixel_values, grids)
    hf_main = torch.cat(hf_out.pooler_output)
    hf_levels = [torch.cat(level) for level in hf_out.deepstack_features]
    assert len(hf_levels) == model.num_deepstack == 2
    ours = torch.cat(model.encode_images(out.mm_features))  # [n, 64 * 3]
    torch.testing.assert_close(ours, torch.cat([hf_main, *hf_levels], -1), atol=1e-4, rtol=0)

    ids = out.prompt_token_ids
    embeds, metadata, kv_caches = _prefill_inputs(model, ids, out.mm_features)
    logits = model.compute_logits(model(embeds, out.mrope_positions, kv_caches, metadata))
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": pixel_values}
    inputs.update(_token_types(ref.model.forward, inputs["input_ids"]))
    hf_logits = ref.model(**inputs, image_grid_thw=grids).logits[0]
    assert (logits - hf_logits).abs().max().item() < 1e-4
    # Without the DeepStack levels the logits move: they are added, and they matter.
    embeds[:, model.config.hidden_size :] = 0
    bare = model.compute_logits(model(embeds, out.mrope_positions, kv_caches, metadata))
    assert (bare - hf_logits).abs().max().item() > 1e-3


def test_load_weights_and_config_errors(ckpt) -> None:
    config = AutoConfig.from_pretrained(ckpt)
    weights = list(iterate_weights(ckpt))
    missing = [(n, t) for n, t in weights if "deepstack_merger_list.1.norm.bias" not in n]
    with pytest.raises(ValueError, match="missing 1 weight"):
        Qwen3VLForConditionalGeneration(config).load_weights(missing)
    with pytest.raises(ValueError, match="unexpected weight 'model.visual.extra'"):
        Qwen3VLForConditionalGeneration(config).load_weights(
            weights + [("model.visual.extra", torch.zeros(1))]
        )
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config(deepstack_visual_indexes=[1, 5]))


# ---------------------------------------------------------------------------------------------
# Engine


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 2048)
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, **kwargs)


def _generate(llm: LLM, batch, params=GREEDY):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in batch]
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


def test_prefix_caching_and_chunked_prefill_match_reference(ckpt, ref, batch) -> None:
    llm = _llm(ckpt, max_num_batched_tokens=32, max_num_seqs=2)
    first = _generate(llm, batch)
    second = _generate(llm, batch)  # the same prompts: prefix-cache hits
    assert all(o.num_cached_tokens > 0 for o in second)
    image_tokens = [o.prompt_token_ids.count(IMAGE_TOKEN_ID) for o in first]
    assert min(image_tokens) > 32  # chunks of 32 end inside image spans
    for outputs in (first, second):
        for (prompt, images), output in zip(batch, outputs):
            compare_with_reference(ref, prompt, images, output)


def test_swapping_images_changes_logprobs(ckpt, ref) -> None:
    prompt = ref.chat_prompt(2, QUESTION)
    a, b = structured_image(224, 168, 0), structured_image(224, 168, 5)  # same grid, other pixels
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    llm = _llm(ckpt)
    out = _generate(llm, [(prompt, [a, b]), (prompt, [b, a])], params)
    assert_swap_changes_logprobs(*out)
    video = {"prompt": prompt, "multi_modal_data": {"video": [np.zeros((2, 32, 32, 3))]}}
    with pytest.raises(ValueError, match="video"):
        llm.generate([video], params, use_tqdm=False)


def test_moe_checkpoints_are_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["Qwen3VLMoeForConditionalGeneration"]})
    )
    with pytest.raises(ValueError, match="Qwen3VLMoeForConditionalGeneration"):
        LLM(model=str(tmp_path), device="cpu")


# ---------------------------------------------------------------------------------------------
# Bench preset


def test_preset_has_the_published_size() -> None:
    from vlmx.bench.floor import WorkItem, workload_floor
    from vlmx.bench.presets import preset_path

    path = preset_path("qwen3-vl-8b")
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == ["Qwen3VLForConditionalGeneration"]
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    num_params = sum(p.numel() for p in model.parameters())
    assert abs(num_params - 8.77e9) < 0.01e9, num_params  # Qwen/Qwen3-VL-8B-Instruct: 8.77B
    # The bench floor of one image of 32 x 32 patches: the tower, its 4 mergers, the decoder.
    image = workload_floor(model, config, [WorkItem(300, 2, [1024])], 1, "H200")
    text = workload_floor(model, config, [WorkItem(300, 2, [])], 1, "H200")
    mergers = [model.visual.merger, *model.visual.deepstack_merger_list]
    merger_params = sum(p.numel() for m in mergers for p in m.parameters())
    vit_params = sum(p.numel() for p in model.visual.parameters()) - merger_params
    attention = 4 * 1024 * 1024 * 1152 * 27
    expected = 2 * 1024 * vit_params + 2 * 256 * merger_params + attention
    assert image.flops - text.flops == pytest.approx(expected)
    preprocessor = json.loads(Path(path, "preprocessor_config.json").read_text())
    assert preprocessor["patch_size"] == 16 and preprocessor["image_mean"] == [0.5] * 3
