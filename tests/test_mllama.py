"""Mllama (Llama 3.2 Vision) against transformers 5.24, on a tiny random checkpoint.

- processor: `MllamaProcessor` + `MllamaImageProcessor` for canvases, tiles, pixels, aspect
  ratio ids, tile counts (`aspect_ratio_mask`), the cross-attention mask and HF's bos rule, over
  many sizes and layouts; every user error raises;
- model: the vision tower against `MllamaVisionModel`, weight loading of both name layouts;
- engine: `LLM.generate` / `LLM.chat` against the HF model (teacher-forced logprobs + greedy)
  with 2 and 3 images of different sizes, text before and between images, text-only requests
  in the same batch; cross K/V computed once per request and freed; prefix caching (the first
  block keyed by every image), chunked prefill, preemption; the scheduler's limit on the images
  the worker's store holds, and the KV cache sized around its reserve; swapped images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoProcessor
from transformers import MllamaForConditionalGeneration as HFMllama
from transformers.models.mllama.image_processing_mllama import (
    get_image_size_fit_to_canvas,
    get_optimal_tiled_canvas,
)

from tests.families.mllama_checkpoint import (
    IMAGE_TOKEN_ID,
    MAX_TILES,
    TILE_SIZE,
    TOKEN_IDS,
    build_mllama_checkpoint,
)
from tests.hf_reference import (
    TEST_ATOL,
    TEST_DEVICE,
    TEST_DTYPE,
    HFReference,
    compare_with_reference,
)
from vlmx import LLM, SamplingParams
from vlmx.demo.images import structured_image
from vlmx.models.loader import iterate_weights
from vlmx.models.mllama import MllamaForConditionalGeneration
from vlmx.models.mllama_processor import cross_attention_spans, fit_to_canvas, tile_canvas
from vlmx.multimodal.media import load_image
from vlmx.worker import cross_attention as cross_module
from vlmx.worker import worker as worker_module

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
SIZES = [(20, 30), (1, 150), (28, 28), (56, 56), (37, 91), (333, 517), (300, 400), (96, 64),
         (30, 900), (700, 25), (1024, 768), (60, 20), (112, 28), (28, 112)]  # fmt: skip
BOS = TOKEN_IDS["<|begin_of_text|>"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return build_mllama_checkpoint(tmp_path_factory.mktemp("mllama"))


@pytest.fixture(scope="module")
def ref(ckpt) -> HFReference:
    return HFReference(ckpt, model_cls=HFMllama)


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return _llm(ckpt)


@pytest.fixture(scope="module")
def cpu_llm(ckpt) -> LLM:
    """On the CPU in float32 whatever the parity run's device: the processor and accounting
    tests compare exact values."""
    return _llm(ckpt, device="cpu", dtype="float32")


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 1024)
    kwargs.setdefault("limit_mm_per_prompt", {"image": 3})
    kwargs.setdefault("dtype", TEST_DTYPE)
    kwargs.setdefault("device", TEST_DEVICE)
    return LLM(model=path, **kwargs)


def _generate(llm: LLM, batch, params=GREEDY):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in batch]
    return llm.generate(prompts, params, use_tqdm=False)


def _image(height: int, width: int, variant: int):
    return structured_image(width, height, variant)


# ---------------------------------------------------------------------------------------------
# Processor


def test_canvas_and_resize_match_hf() -> None:
    for height, width in SIZES + [(560, 560), (1, 1), (2000, 10), (10, 2000)]:
        for max_tiles, tile in [(4, TILE_SIZE), (4, 560), (6, 100), (1, 50), (8, 28)]:
            canvas = tuple(int(x) for x in get_optimal_tiled_canvas(height, width, max_tiles, tile))
            rows, cols = tile_canvas(height, width, max_tiles, tile)
            assert (rows * tile, cols * tile) == canvas, (height, width, max_tiles, tile)
            hf = get_image_size_fit_to_canvas(height, width, canvas[0], canvas[1], tile)
            assert fit_to_canvas(height, width, *canvas, tile) == tuple(int(x) for x in hf)


def test_processor_matches_hf(cpu_llm, ckpt) -> None:
    hf_processor = AutoProcessor.from_pretrained(ckpt)
    processor = cpu_llm.llm_engine.processor
    tokenizer = cpu_llm.get_tokenizer()
    for i in range(0, len(SIZES) - 1, 2):
        images = [_image(*SIZES[i], i), _image(*SIZES[i + 1], i + 1)]
        prompt = f"<|image|>Look: <|image|><|begin_of_text|>{QUESTION}"
        hf = hf_processor(text=[prompt], images=images, return_tensors="pt")
        ours = processor.process(tokenizer.encode(prompt), [load_image(im) for im in images], {})
        assert ours.prompt_token_ids == hf["input_ids"][0].tolist()
        for j, feature in enumerate(ours.mm_features):
            pixels = feature.data["pixel_values"].float()
            assert (pixels - hf["pixel_values"][0, j]).abs().max().item() < 1e-5
            assert feature.data["aspect_ratio_id"].item() == hf["aspect_ratio_ids"][0, j].item()
            assert feature.data["num_tiles"].item() == hf["aspect_ratio_mask"][0, j].sum().item()
            assert ours.prompt_token_ids[feature.placeholder.offset] == IMAGE_TOKEN_ID
            assert feature.placeholder.length == 1


def _dense_mask(spans, num_tiles: list[int], length: int) -> np.ndarray:
    out = np.zeros((length, len(spans), MAX_TILES), dtype=np.int64)
    for i, ((start, end), n) in enumerate(zip(spans, num_tiles)):
        out[start : length if end is None else end, i, :n] = 1
    return out


@pytest.mark.parametrize(
    "prompt",
    [
        f"<|image|><|image|><|begin_of_text|>{QUESTION}",  # the vLLM example's form
        f"<|begin_of_text|>Text first. <|image|> and then <|image|>{QUESTION}",
        f"<|image|>One <|image|><|image|> two three {QUESTION}",
        f"Before the images {QUESTION}<|image|><|image|>",
    ],
)
def test_cross_attention_mask_and_bos_match_hf(cpu_llm, ckpt, prompt) -> None:
    llm = cpu_llm
    hf_processor = AutoProcessor.from_pretrained(ckpt)
    n = prompt.count("<|image|>")
    sizes = [(56, 56), (20, 30), (112, 28), (300, 400)][:n]
    images = [_image(*s, i) for i, s in enumerate(sizes)]
    hf = hf_processor(text=[prompt], images=images, return_tensors="pt")
    processor = llm.llm_engine.processor
    ours = processor.process(
        llm.get_tokenizer().encode(prompt), [load_image(im) for im in images], {}
    )
    assert ours.prompt_token_ids == hf["input_ids"][0].tolist()  # HF's bos rule included
    spans = cross_attention_spans([f.placeholder.offset for f in ours.mm_features])
    tiles = [int(f.data["num_tiles"]) for f in ours.mm_features]
    expected = hf["cross_attention_mask"][0].numpy()
    assert (_dense_mask(spans, tiles, expected.shape[0]) == expected).all()


def test_processor_errors(cpu_llm, ckpt) -> None:
    llm = cpu_llm
    processor = llm.llm_engine.processor
    ids = llm.get_tokenizer().encode(f"<|image|><|begin_of_text|>{QUESTION}")
    image = load_image(_image(56, 56, 0))
    # image-only prompt without <|image|> tokens: HF's processor refuses it, so do we
    no_token = llm.get_tokenizer().encode(QUESTION)
    with pytest.raises(ValueError, match=r"0 image placeholders \(<\|image\|>\) but 1 images"):
        processor.process(no_token, [image], {})
    with pytest.raises(ValueError, match="1 image placeholders .* 2 images"):
        processor.process(ids, [image, image], {})
    with pytest.raises(ValueError, match="unknown mm_processor_kwargs"):
        processor.process(ids, [image], {"max_patches": 2})
    with pytest.raises(ValueError, match="max_image_tiles=2 differs"):
        processor.process(ids, [image], {"max_image_tiles": 2})
    with pytest.raises(ValueError, match="Mllama takes 3 per prompt"):
        processor.process(ids, [image] * 4, {})
    with pytest.raises(ValueError, match="vlmx takes images only"):
        llm.llm_engine.input_processor.process(
            {"prompt": "<|image|>x", "multi_modal_data": {"video": [np.zeros((2, 8, 8, 3))]}}
        )


def test_one_image_per_prompt_unless_limited(ckpt) -> None:
    llm = LLM(model=ckpt, max_model_len=256, max_num_seqs=2)  # no limit_mm_per_prompt
    processor = llm.llm_engine.processor
    ids = llm.get_tokenizer().encode(f"<|image|><|image|><|begin_of_text|>{QUESTION}")
    image = load_image(_image(56, 56, 0))
    with pytest.raises(ValueError, match=r"limit_mm_per_prompt=\{'image': 1\}"):
        processor.process(ids, [image, image], {})
    store = llm.llm_engine.executor.runner.cross
    assert store.capacity == 2  # max_num_seqs requests of one image


# ---------------------------------------------------------------------------------------------
# Model


def test_vision_tower_and_weights_match_hf(ckpt, ref, tmp_path) -> None:
    config = AutoConfig.from_pretrained(ckpt)
    model = MllamaForConditionalGeneration(config).eval()
    model.load_weights(iterate_weights(ckpt))
    images = [_image(56, 56, 0), _image(20, 30, 1)]
    hf = ref.processor(text=["<|image|><|image|>x"], images=images, return_tensors="pt")
    num_tiles = hf["aspect_ratio_mask"][0].sum(-1)
    with torch.no_grad():
        expected = ref.model.model.vision_model(
            hf["pixel_values"], hf["aspect_ratio_ids"], hf["aspect_ratio_mask"]
        ).last_hidden_state[0]
        ours = model.vision_model(hf["pixel_values"][0], hf["aspect_ratio_ids"][0], num_tiles)
    assert (ours - expected).abs().max().item() < 1e-4

    modules = build_mllama_checkpoint(tmp_path / "modules", layout="modules")
    names = [n for n, _ in iterate_weights(modules)]
    assert any(n.startswith("model.vision_model.") for n in names)
    other = MllamaForConditionalGeneration(config).eval()
    other.load_weights(iterate_weights(modules))
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    weights = list(iterate_weights(ckpt))
    missing = [(n, t) for n, t in weights if "layers.1.cross_attn_mlp_gate" not in n]
    with pytest.raises(ValueError, match="missing 1 weight"):
        MllamaForConditionalGeneration(config).load_weights(missing)


# ---------------------------------------------------------------------------------------------
# Engine


@pytest.fixture(scope="module")
def batch(ref, test_images):
    """2 and 3 images of different sizes: the chat form (text before the images, so rows
    without a visible image), the example's form, and images between text."""
    return [
        (ref.chat_prompt(2, QUESTION), test_images[1:3]),
        (f"<|image|><|image|><|image|><|begin_of_text|>{QUESTION}", test_images[2:5]),
        (f"<|begin_of_text|>First <|image|> then <|image|>{QUESTION}", test_images[0:2]),
    ]


def test_generate_and_chat_match_reference(llm, ref, batch, test_images) -> None:
    store = llm.llm_engine.executor.runner.cross
    computed = store.num_computed
    text_only = (f"<|begin_of_text|>{QUESTION}", [])  # no images: cross layers skipped
    outputs = _generate(llm, [*batch, text_only])
    assert store.num_computed == computed + len(batch)  # once per request, over every step
    # freed when the requests finished: the workers hear of the last ones with the next step
    assert len(store.entries) <= len(batch)
    _generate(llm, [text_only], SamplingParams(max_tokens=1))
    assert not store.entries
    for (prompt, images), out in zip([*batch, text_only], outputs):
        assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
        compare_with_reference(ref, prompt, images, out)

    content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in batch[0][1]]
    content.append({"type": "text", "text": QUESTION})
    [chat] = llm.chat([{"role": "user", "content": content}], GREEDY, use_tqdm=False)
    # NOTE: chat tokenizes the template's rendering (with its <|begin_of_text|>) without adding
    # special tokens; HF's processor adds the tokenizer's bos to the text, and so do we.
    assert chat.prompt_token_ids == outputs[0].prompt_token_ids
    assert chat.outputs[0].token_ids == outputs[0].outputs[0].token_ids
    compare_with_reference(ref, batch[0][0].removeprefix("<|begin_of_text|>"), batch[0][1], chat)


def _data_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _check_same(outputs, baseline) -> None:
    for out, base in zip(outputs, baseline, strict=True):
        assert out.prompt_token_ids == base.prompt_token_ids
        assert out.outputs[0].token_ids == base.outputs[0].token_ids
        for a, b in zip(out.outputs[0].logprobs, base.outputs[0].logprobs):
            for token_id in b:
                assert abs(a[token_id].logprob - b[token_id].logprob) < max(2e-3, TEST_ATOL)


def test_prefix_caching_and_chunked_prefill(ckpt, llm, ref, batch, test_images) -> None:
    baseline = _generate(_llm(ckpt, enable_prefix_caching=False), batch)
    cached = _llm(ckpt, enable_prefix_caching=True, block_size=4)
    store = cached.llm_engine.executor.runner.cross
    _check_same(_generate(cached, batch), baseline)
    computed = store.num_computed
    second = _generate(cached, batch)
    _check_same(second, baseline)
    assert all(o.num_cached_tokens > 0 for o in second)  # the image tokens' blocks hit
    assert store.num_computed == computed + len(batch)  # hits still get their cross K/V

    # The same long text before other images: its first block's KV depends on the images (the
    # rows before an image attend to all of them), so it must not be shared.
    prefix = "<|begin_of_text|>" + "You are a helpful assistant. " * 4
    a = (f"{prefix}<|image|>{QUESTION}", test_images[:1])
    b = (f"{prefix}<|image|>{QUESTION}", test_images[3:4])
    _generate(cached, [a])
    [out] = _generate(cached, [b])
    compare_with_reference(ref, *b, out)

    # Chunks of 4 tokens: boundaries inside the text after the images, and between them.
    assert all(len(o.prompt_token_ids) > 12 for o in baseline)
    chunked = _llm(ckpt, max_num_batched_tokens=4, max_num_seqs=2)
    _check_same(_generate(chunked, batch), baseline)


def test_preemption_and_async_scheduling(ckpt, llm, batch) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=3)
    baseline = _generate(llm, batch, params)
    small = _llm(
        ckpt, num_gpu_blocks_override=12, block_size=8, max_num_seqs=3, async_scheduling=True
    )
    store = small.llm_engine.executor.runner.cross
    _check_same(_generate(small, batch, params), baseline)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert store.num_computed > len(batch)  # resumed requests computed theirs again


def test_cross_kv_reserve_limits_admission_and_kv_blocks(ckpt, cpu_llm, batch, monkeypatch) -> None:
    llm = cpu_llm  # the CPU's KV and cross-attention budgets, patched below
    baseline = _generate(llm, batch)
    per_image = llm.llm_engine.executor.runner.cross.bytes_per_image
    # room for 4 images at once: the 3-image request runs alone, the 2-image ones two at a time
    monkeypatch.setattr(cross_module, "_CPU_CROSS_KV_BYTES", 4 * per_image)
    kv_budget = 200 * llm.llm_engine.executor.runner.bytes_per_block() + 4 * per_image
    monkeypatch.setattr(worker_module, "_CPU_KV_BYTES", kv_budget)
    limited = _llm(ckpt, max_num_seqs=4, device="cpu", dtype="float32")
    engine = limited.llm_engine
    assert engine.executor.cross_attention_images == 4
    assert engine.executor.runner.cross.reserved_bytes() == 4 * per_image
    assert engine.num_kv_blocks == 200  # the KV cache gets the budget less the reserve
    held = []
    schedule = engine.scheduler.schedule

    def checked():
        out = schedule()
        engine.scheduler.check_integrity()
        held.append(sum(engine.scheduler.cross_images.values()))
        return out

    monkeypatch.setattr(engine.scheduler, "schedule", checked)
    _check_same(_generate(limited, batch), baseline)
    assert max(held) <= 4 and 3 in held


def test_swapping_images_changes_logprobs(llm, test_images) -> None:
    prompt = f"<|image|><|image|><|begin_of_text|>{QUESTION}"
    a, b = _image(56, 56, 0), _image(56, 56, 5)  # same tiles, other pixels
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = _generate(llm, [(prompt, [a, b]), (prompt, [b, a])], params)
    assert out[0].prompt_token_ids == out[1].prompt_token_ids
    first, second = ({t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in out)
    assert set(first) != set(second) or max(abs(first[t] - second[t]) for t in first) > 1e-3
    assert BOS in out[0].prompt_token_ids


def test_bench_preset_is_the_published_size() -> None:
    from vlmx.bench.mllama_preset import llama_3_2_11b_vision
    from vlmx.bench.presets import PRESETS
    from vlmx.bench.workloads import prompt_form

    family, make_config = PRESETS["llama-3.2-11b-vision"]
    config = make_config()
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    assert family == "mllama" and make_config is llama_3_2_11b_vision
    assert sum(p.numel() for p in model.parameters()) == 10_670_220_835  # the published count
    assert (model.num_layers, model.num_cross_layers) == (32, 8)
    assert model.num_cross_keys_per_image == 4 * 1601
    assert model.cross_kv_bytes_per_image() == 8 * 2 * 4 * 1601 * 8 * 128 * 4  # float32 here
    prompt = prompt_form("mllama")("q", 2)
    assert prompt == "<|image|><|image|><|begin_of_text|>q"
