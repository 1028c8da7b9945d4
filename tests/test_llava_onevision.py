"""LLaVA-OneVision against transformers 5.24, on tiny random checkpoints.

- processor: `LlavaOnevisionProcessor` + `LlavaOnevisionImageProcessor` (torchvision) for the
  AnyRes tiles of a prompt's only image, the padded squares of several-image prompts, pixels
  and `<image>` counts over many sizes, and the published config's arithmetic (384 px tiles,
  36 pinpoints, anyres_max_9);
- model: `LlavaOnevisionModel.get_image_features` (unpadding, the bilinear down-scaling, the
  newlines) for both prompt kinds and tower variants, both checkpoint naming schemes;
- engine: `LLM.generate` / `LLM.chat` against the HF model (teacher-forced logprobs + greedy) on
  prompts of 1, 2 and 3 images, with prefix caching, chunked prefill and swapped images.

The HF reference gets each prompt's images as one list (`images=[[...]]`), as its chat template
path passes them: a prompt's images are processed together (several: one tile each).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoProcessor
from transformers import LlavaOnevisionForConditionalGeneration as HFOnevision
from transformers.image_processing_utils import select_best_resolution

from tests.families.llava_onevision_checkpoint import (
    IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    build_llava_onevision_checkpoint,
    tiny_llava_onevision_config,
)
from tests.family_helpers import (
    assert_same_outputs,
    assert_swap_changes_logprobs,
    check_generate_and_chat,
    engine_processor,
    image_tensor,
)
from tests.family_helpers import checkpoint_model_config as model_config
from tests.hf_reference import (
    TEST_ATOL,
    TEST_DEVICE,
    TEST_DTYPE,
    HFReference,
)
from vlmx import LLM, SamplingParams
from vlmx.bench.presets import preset_path
from vlmx.cli import main as cli_main
from vlmx.demo.checkpoint import randomize_zero_params
from vlmx.demo.images import structured_image
from vlmx.layers.anyres import best_resolution
from vlmx.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from vlmx.models.llava_onevision_processor import LlavaOnevisionProcessor
from vlmx.models.loader import iterate_weights, load_hf_config

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
PIXEL_ATOL = 1e-5  # observed: 0.0 (same torchvision ops on the CPU)
FEATURE_ATOL = 1e-4
# (height, width): tiny, square, wide, tall, odd, extreme aspect, large
SIZES = [(20, 30), (1, 150), (56, 56), (112, 112), (37, 91), (333, 517), (300, 400), (96, 64),
         (30, 900), (700, 25), (1024, 768), (168, 100)]  # fmt: skip
PUBLISHED_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return build_llava_onevision_checkpoint(tmp_path_factory.mktemp("ov"), "transformers")


@pytest.fixture(scope="module")
def hf_processor(ckpt):
    return AutoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def tok(hf_processor):
    return hf_processor.tokenizer


class OnevisionReference(HFReference):
    """The HF model and processor, each prompt's images passed as one list."""

    def inputs(self, prompt: str, images: list) -> dict:
        nested = [images] if images else None
        return self.processor(text=[prompt], images=nested, return_tensors="pt")


@pytest.fixture(scope="module")
def ref(ckpt) -> OnevisionReference:
    return OnevisionReference(ckpt, model_cls=HFOnevision)


def prompt_text(num_images: int) -> str:
    """A prompt as the chat template writes it: the images first, then the text."""
    return f"<|im_start|>user {'<image>' * num_images}\nDescribe.<|im_end|><|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------
# Processor


def test_best_resolution_and_published_counts_match_hf(tok) -> None:
    """The AnyRes arithmetic at the published sizes: 384 px tiles, 6 x 6 pinpoints, 729 tokens."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionVideoProcessor
    from transformers import LlavaOnevisionProcessor as HFProcessor

    hf = HFProcessor(
        image_processor=LlavaOnevisionImageProcessor(image_grid_pinpoints=PUBLISHED_PINPOINTS),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    config = tiny_llava_onevision_config("anyres_max_9", image_grid_pinpoints=PUBLISHED_PINPOINTS)
    config.vision_config.image_size = 384
    ours = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    ours.hf_config, ours.tokenizer, ours.engine_kwargs = config, tok, {}
    ours.device = torch.device("cpu")
    ours.configure({"size": {"height": 384, "width": 384}}, {"num_image_tokens": 729})
    sizes = SIZES + [(384, 384), (768, 1536), (4000, 300), (2304, 2304), (5000, 5000), (9, 1)]
    for height, width in sizes:
        assert best_resolution(height, width, PUBLISHED_PINPOINTS) == tuple(
            select_best_resolution((height, width), PUBLISHED_PINPOINTS)
        )
        expected = hf._get_number_of_features(height, width, 384, 384)
        assert ours.num_image_tokens(height, width) == expected, (height, width)
        assert ours.num_image_tokens(height, width, num_images=2) == 730


def _hf_pixels(hf_out, i: int, num_tiles: int) -> torch.Tensor:
    return hf_out["pixel_values"][i][:num_tiles]


def test_processor_matches_hf(ckpt, tok, hf_processor) -> None:
    processor = engine_processor(LlavaOnevisionProcessor, model_config(ckpt))
    images = [image_tensor(h, w, i) for i, (h, w) in enumerate(SIZES)]
    # each image alone in its prompt (AnyRes), then all in one prompt (one square tile each)
    cases = [([image], prompt_text(1)) for image in images] + [(images, prompt_text(len(images)))]
    scaled = 0
    for prompt_images, text in cases:
        hf_out = hf_processor(text=[text], images=[prompt_images], return_tensors="pt")
        out = processor.process(tok(text)["input_ids"], prompt_images, {})
        assert out.prompt_token_ids == hf_out["input_ids"][0].tolist()
        cursor = 0
        for i, (image, feature) in enumerate(zip(prompt_images, out.mm_features, strict=True)):
            pixels = feature.data["pixel_values"]
            assert (pixels - _hf_pixels(hf_out, i, pixels.shape[0])).abs().max() <= PIXEL_ATOL
            assert feature.data["image_size"].tolist() == list(image.shape[-2:])
            p = feature.placeholder
            assert p.offset >= cursor and set(out.prompt_token_ids[p.offset : p.end]) == {
                IMAGE_TOKEN_ID
            }
            cursor = p.end
            n = len(prompt_images)
            assert processor.num_image_tokens(*image.shape[-2:], num_images=n) == p.length
            if n == 1 and p.length < NUM_IMAGE_TOKENS + pixels.shape[0] * NUM_IMAGE_TOKENS // 2:
                scaled += 1
        assert out.prompt_token_ids.count(IMAGE_TOKEN_ID) == sum(
            f.num_embeds for f in out.mm_features
        )
    assert scaled >= 2  # some grids were scaled down (anyres_max_4)


def test_expanded_prompt_is_kept_and_errors_are_clear(ckpt, tok, hf_processor) -> None:
    processor = engine_processor(LlavaOnevisionProcessor, model_config(ckpt))
    images = [image_tensor(90, 200, 0), image_tensor(64, 64, 1)]
    out = processor.process(tok(prompt_text(2))["input_ids"], images, {})
    again = processor.process(out.prompt_token_ids, images, {})
    assert again.prompt_token_ids == out.prompt_token_ids
    assert [f.placeholder for f in again.mm_features] == [f.placeholder for f in out.mm_features]
    with pytest.raises(ValueError, match="takes none"):
        processor.process(tok(prompt_text(2))["input_ids"], images, {"max_patches": 2})
    with pytest.raises(ValueError, match="takes none"):
        engine_processor(
            LlavaOnevisionProcessor, model_config(ckpt, {"image_grid_pinpoints": [[56, 56]]})
        )
    with pytest.raises(ValueError, match=r"1 image placeholders \(<image>\) but 2 images"):
        processor.process(tok(prompt_text(1))["input_ids"], images, {})
    with pytest.raises(ValueError, match="video placeholders"):
        processor.process(tok(prompt_text(2) + "<video>")["input_ids"], images, {})


def test_default_strategy_refuses_a_lone_image_and_counts_one_less(tmp_path, tok) -> None:
    config = tiny_llava_onevision_config(vision_feature_select_strategy="default")
    path = build_llava_onevision_checkpoint(
        tmp_path / "default", vision_feature_select_strategy="default"
    )
    hf_processor = AutoProcessor.from_pretrained(path)
    processor = engine_processor(LlavaOnevisionProcessor, model_config(path))
    images = [image_tensor(90, 200, 0), image_tensor(64, 64, 1)]
    out = processor.process(tok(prompt_text(2))["input_ids"], images, {})
    hf_out = hf_processor(text=[prompt_text(2)], images=[images], return_tensors="pt")
    assert out.prompt_token_ids == hf_out["input_ids"][0].tolist()
    assert [f.num_embeds for f in out.mm_features] == [NUM_IMAGE_TOKENS] * 2
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default' cannot tile"):
        processor.process(tok(prompt_text(1))["input_ids"], images[:1], {})
    hf = _hf_model(config)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.load_weights(hf.state_dict().items())
    _check_features(hf, model, out.mm_features, hf_out)


# ---------------------------------------------------------------------------------------------
# Model


def _hf_model(config) -> HFOnevision:
    torch.manual_seed(0)
    model = HFOnevision(config).eval()
    randomize_zero_params(model, 0)
    return model


def _check_features(hf, model, features, hf_out) -> None:
    with torch.no_grad():
        expected = hf.model.get_image_features(
            pixel_values=hf_out["pixel_values"],
            image_sizes=hf_out["image_sizes"],
            batch_num_images=hf_out["batch_num_images"],
            vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
            vision_aspect_ratio=hf.config.vision_aspect_ratio,
        ).pooler_output
        ours = model.encode_images(features)
    assert [o.shape for o in ours] == [e.shape for e in expected]
    for o, e in zip(ours, expected):
        assert (o - e).abs().max().item() < FEATURE_ATOL


@pytest.mark.parametrize(
    "overrides",
    [{}, {"vision_feature_layer": -2}, {"vision_feature_layer": [-3, -1]}],
    ids=["last", "second-last", "two-layers"],
)
def test_image_features_match_hf(ckpt, tok, hf_processor, overrides) -> None:
    config = tiny_llava_onevision_config(**overrides)
    hf = _hf_model(config)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.load_weights(hf.state_dict().items())  # the module names: model.vision_tower.* ...
    processor = engine_processor(LlavaOnevisionProcessor, model_config(ckpt))
    images = [image_tensor(333, 517, 0), image_tensor(700, 25, 1), image_tensor(56, 56, 2)]
    for group in ([images[0]], [images[1]], images):  # lone images (AnyRes), then several
        text = prompt_text(len(group))
        out = processor.process(tok(text)["input_ids"], group, {})
        hf_out = hf_processor(text=[text], images=[group], return_tensors="pt")
        _check_features(hf, model, out.mm_features, hf_out)


def test_load_weights_hub_layout_and_refusals(ckpt, tmp_path) -> None:
    config = AutoConfig.from_pretrained(ckpt)
    weights = list(iterate_weights(ckpt))
    hub = build_llava_onevision_checkpoint(tmp_path / "hub", "hub")
    a = LlavaOnevisionForConditionalGeneration(config)
    b = LlavaOnevisionForConditionalGeneration(config)
    a.load_weights(weights)
    b.load_weights(iterate_weights(hub))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    missing = [(n, t) for n, t in weights if n != "image_newline"]
    with pytest.raises(ValueError, match="missing 1 weight"):
        LlavaOnevisionForConditionalGeneration(config).load_weights(missing)
    with pytest.raises(ValueError, match="unexpected weight 'vision_tower.extra'"):
        LlavaOnevisionForConditionalGeneration(config).load_weights(
            weights + [("vision_tower.extra", torch.zeros(1))]
        )
    with pytest.raises(ValueError, match="vision_aspect_ratio 'anyres' is not supported"):
        LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config("anyres"))
    with pytest.raises(ValueError, match="vision_feature_layer 9 is out of range"):
        LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config(vision_feature_layer=9))


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
    """Prompts of 1 (AnyRes), 2 and 3 images of different sizes (chat-template form)."""
    groups = [test_images[3:4], test_images[1:3], test_images[2:5]]  # 400x300: 3x3, scaled
    return [(ref.chat_prompt(len(g), QUESTION), g) for g in groups]


def test_generate_and_chat_match_reference(ckpt, ref, batch) -> None:
    llm = _llm(ckpt)
    gen = _generate(llm, batch)
    processor = llm.llm_engine.processor
    assert processor.num_image_tokens(300, 400) == gen[0].prompt_token_ids.count(IMAGE_TOKEN_ID)
    # 3 x 3 tiles: a 12 x 12 grid, unpadded to 10 x 12, scaled to 7 x 8, a newline per row
    assert processor.num_image_tokens(300, 400) == NUM_IMAGE_TOKENS + 7 * (8 + 1)
    check_generate_and_chat(llm, ref, batch, gen, QUESTION, GREEDY)


def test_prefix_caching_and_chunked_prefill(ckpt, batch) -> None:
    baseline = _generate(_llm(ckpt, enable_prefix_caching=False), batch)

    def check(outputs):
        assert_same_outputs(outputs, baseline, TEST_ATOL)

    llm = _llm(ckpt, enable_prefix_caching=True)
    check(_generate(llm, batch))
    second = _generate(llm, batch)
    check(second)
    assert all(o.num_cached_tokens > 0 for o in second)

    image_tokens = [o.prompt_token_ids.count(IMAGE_TOKEN_ID) for o in baseline]
    assert min(image_tokens) > 16  # chunks end inside image spans
    chunked = _llm(ckpt, max_num_batched_tokens=16, max_num_seqs=2, enable_prefix_caching=False)
    check(_generate(chunked, batch))


def test_swapping_images_changes_logprobs(ckpt, ref) -> None:
    prompt = ref.chat_prompt(2, QUESTION)
    a, b = structured_image(120, 90, 0), structured_image(120, 90, 5)  # same size, other pixels
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = _generate(_llm(ckpt), [(prompt, [a, b]), (prompt, [b, a])], params)
    assert_swap_changes_logprobs(*out)


# ---------------------------------------------------------------------------------------------
# Bench


def test_preset_is_the_published_size() -> None:
    """The bench preset: llava-onevision-qwen2-7b-ov-hf's 8.03 B parameters (on the meta device),
    and its folder's processor files as vlmx reads them (the counts' arithmetic at these sizes
    is checked against HF in `test_best_resolution_and_published_counts_match_hf`)."""
    path = preset_path("llava-onevision-qwen2-7b")
    config = load_hf_config(path)
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    assert 8.02e9 < sum(p.numel() for p in model.parameters()) < 8.04e9
    assert (model.side, model.max_tiles, len(model.pinpoints)) == (27, 9, 36)
    processor = engine_processor(LlavaOnevisionProcessor, model_config(path))
    s = processor.settings
    assert (s.tile_size, s.side, s.max_tiles, s.image_mean) == (384, 27, 9, (0.5, 0.5, 0.5))
    assert processor.image_token_id == 151646 and processor.video_token_id == 151647
    assert processor.num_image_tokens(768, 1024, num_images=2) == 27 * 27 + 1
    assert processor.num_image_tokens(384, 384) == 27 * 27 + 27 * 28  # the base and one tile


def test_bench_runs_vlmx_and_hf(ckpt, tmp_path, capsys) -> None:
    out_file = tmp_path / "results.json"
    args = ["bench", "--model", ckpt, "--workload", "w1-multi", "--output-len", "4"]
    args += ["--num-prompts", "2", "--backend", "both", "--device", "cpu", "--card", "H100"]
    assert cli_main([*args, "--json", str(out_file)]) == 0
    vlmx_result, hf_result = json.loads(out_file.read_text())
    # 2 prompts of 2 images, each one tile (17 tokens): the same prompts on both sides
    assert vlmx_result["input_tokens"] == hf_result["input_tokens"]
    assert vlmx_result["encoded_images"] == 4 and vlmx_result["output_tokens"] == 8
    assert "vlmx / hf images/s (w1-multi)" in capsys.readouterr().out


@pytest.mark.parametrize("size", [(28, 28), (384, 384), (31, 45)])
def test_patchify_matches_a_stride_p_conv(size) -> None:
    """The published tower's 384 px tiles with patch 14 leave 6 pixels over (27 x 27 patches):
    patchify drops them, as HF's Conv2d patch embedding does."""
    from vlmx.layers.siglip import patchify

    h, w = size
    pixels = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    conv = torch.nn.Conv2d(3, 5, kernel_size=14, stride=14, bias=False)
    expected = conv(pixels).flatten(2).transpose(1, 2)  # [2, (h // 14) * (w // 14), 5]
    got = patchify(pixels, 14) @ conv.weight.reshape(5, -1).T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
