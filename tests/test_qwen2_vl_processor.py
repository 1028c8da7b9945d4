"""Qwen2VLProcessor against transformers 5.24: Qwen2VLImageProcessor (default torchvision backend)
for pixels and grids, Qwen2VLModel / Qwen2_5_VLModel.get_rope_index for M-RoPE positions."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLModel,
    Qwen2VLImageProcessor,
    Qwen2VLModel,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from vlmx.config import ModelConfig
from vlmx.demo.configs import tiny_qwen_vl_config
from vlmx.models.qwen2_vl_processor import Qwen2VLProcessor, smart_resize

IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 151655, 151656, 151652, 151653
ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
CLASS_MAX_PIXELS = 28 * 28 * 1280  # Qwen2VLImageProcessor's default
# preprocessor_config.json as published with Qwen/Qwen2-VL-7B-Instruct (hub layout)
HUB_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
# (height, width): tiny, exact multiples, odd, portrait / landscape, extreme aspect, large
SIZES = [
    (20, 30),
    (1, 150),
    (56, 56),
    (37, 91),
    (333, 517),
    (1024, 768),
    (768, 1024),
    (30, 5000),
    (4000, 25),
    (2000, 1500),
]
TOLERANCE = 1e-5  # observed on CPU: 0.0 (same torchvision ops in the same order)


def structured_image(height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 [3, H, W]: gradients, a checkerboard, a disc and a little noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(-1, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, -1).expand(height, width)
    period = 3 + seed % 7
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    checker = ((rows // period + cols // period) % 2).float()
    disc = (((y - 0.4) ** 2 + (x - 0.6) ** 2) < 0.05).float()
    red = 255 * y
    green = 255 * (0.7 * x + 0.3 * disc)
    blue = 200 * checker + 55 * torch.rand(height, width, generator=gen)
    return torch.stack([red, green, blue]).round().clamp(0, 255).to(torch.uint8)


def write_checkpoint(path, family: str = "qwen2_vl", files: dict | None = None) -> str:
    config = tiny_qwen_vl_config(family)
    config.architectures = [ARCHITECTURES[family]]
    config.save_pretrained(path)
    for name, content in (files or {}).items():
        (path / name).write_text(json.dumps(content))
    return str(path)


def make_model_config(
    path: str, mm_processor_kwargs: dict | None = None, dtype: torch.dtype = torch.float32
) -> ModelConfig:
    hf_config = AutoConfig.from_pretrained(path)
    return ModelConfig(
        model=path,
        model_path=path,
        tokenizer_path=path,
        tokenizer_mode="auto",
        trust_remote_code=False,
        hf_config=hf_config,
        architecture=hf_config.architectures[0],
        dtype=dtype,
        max_model_len=32768,
        mm_processor_kwargs=mm_processor_kwargs or {},
    )


def make_processor(tmp_path, files=None, family="qwen2_vl", **kwargs) -> Qwen2VLProcessor:
    path = write_checkpoint(
        tmp_path, family, files or {"preprocessor_config.json": HUB_PREPROCESSOR}
    )
    return new_processor(make_model_config(path, **kwargs))


def new_processor(config: ModelConfig) -> Qwen2VLProcessor:
    # NOTE: Qwen2-VL's processor reads no token of the tokenizer (its ids are in the config),
    # and these checkpoints have none.
    return Qwen2VLProcessor(config, None, torch.device("cpu"))


def prompt_with_images(num_images: int, trailing_text: bool = True) -> list[int]:
    ids = [100, 101, 102]
    for i in range(num_images):
        ids += [VISION_START, IMAGE_PAD, VISION_END] + [200 + i] * (i + 1)
    return ids + ([300, 301] if trailing_text else [])


def hf_image_processor(path: str, **kwargs) -> Qwen2VLImageProcessor:
    hf = AutoImageProcessor.from_pretrained(path, **kwargs)
    assert type(hf) is Qwen2VLImageProcessor and hf.backend == "torchvision"
    return hf


def assert_matches_hf(features, hf_out) -> float:
    hf_grids = hf_out["image_grid_thw"]  # [N, 3]
    hf_pixels = hf_out["pixel_values"].split((hf_grids.prod(-1)).tolist())
    assert len(features) == len(hf_grids)
    max_diff = 0.0
    for feature, grid, pixels in zip(features, hf_grids, hf_pixels, strict=True):
        assert feature.data["image_grid_thw"].tolist() == grid.tolist()
        assert feature.num_embeds == int(grid.prod()) // 4
        ours = feature.data["pixel_values"]
        assert ours.shape == pixels.shape and ours.dtype == torch.float32
        max_diff = max(max_diff, (ours - pixels).abs().max().item())
    assert max_diff <= TOLERANCE
    return max_diff


@pytest.mark.parametrize("max_pixels", [CLASS_MAX_PIXELS, HUB_PREPROCESSOR["max_pixels"]])
def test_pixels_and_grids_match_hf(tmp_path, max_pixels):
    files = {"preprocessor_config.json": {**HUB_PREPROCESSOR, "max_pixels": max_pixels}}
    proc = make_processor(tmp_path, files)
    # two different images of each of two sizes, so that batched resizing is exercised
    images = [structured_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    images += [structured_image(333, 517, 50), structured_image(1024, 768, 51)]
    out = proc.process(prompt_with_images(len(images)), images, {})
    hf_out = hf_image_processor(str(tmp_path))(images=images, return_tensors="pt")
    assert_matches_hf(out.mm_features, hf_out)
    if max_pixels == CLASS_MAX_PIXELS:  # the 2000x1500 image was scaled down to fit
        assert out.mm_features[SIZES.index((2000, 1500))].num_embeds <= max_pixels // 28**2


ENGINE_LIMITS = {"min_pixels": 50_000, "max_pixels": 200_000}


@pytest.mark.parametrize(
    "engine_kwargs, prompt_kwargs",
    [
        ({}, {"max_pixels": 100_000}),
        ({}, {"min_pixels": 300_000}),
        (ENGINE_LIMITS, {}),
        (ENGINE_LIMITS, {"max_pixels": 100_000}),
        (ENGINE_LIMITS, {"min_pixels": 150_000}),
    ],
)
def test_pixel_limits_engine_wide_and_per_prompt(tmp_path, engine_kwargs, prompt_kwargs):
    proc = make_processor(tmp_path, mm_processor_kwargs=engine_kwargs)
    images = [structured_image(h, w, seed) for seed, (h, w) in enumerate(SIZES[:7])]
    out = proc.process(prompt_with_images(len(images)), images, prompt_kwargs)
    hf = hf_image_processor(str(tmp_path), **{**engine_kwargs, **prompt_kwargs})
    assert_matches_hf(out.mm_features, hf(images=images, return_tensors="pt"))


def test_pixel_values_in_model_dtype(tmp_path):
    proc = make_processor(tmp_path, dtype=torch.bfloat16)
    image = structured_image(300, 200, 0)
    pixels = proc.process(prompt_with_images(1), [image], {}).mm_features[0].data["pixel_values"]
    hf_pixels = hf_image_processor(str(tmp_path))(images=[image], return_tensors="pt")
    assert pixels.dtype == torch.bfloat16
    assert torch.equal(pixels, hf_pixels["pixel_values"].to(torch.bfloat16))


@pytest.mark.parametrize(
    "height, width",
    [(20, 30), (1, 150), (10, 1999), (27, 27), (14, 15), (999, 1001), (3000, 4000), (100, 20000)],
)
@pytest.mark.parametrize("min_pixels, max_pixels", [(3136, CLASS_MAX_PIXELS), (100_000, 150_000)])
def test_smart_resize_matches_hf(height, width, min_pixels, max_pixels):
    assert smart_resize(height, width, 28, min_pixels, max_pixels) == hf_smart_resize(
        height, width, 28, min_pixels, max_pixels
    )


def test_aspect_ratio_error_like_hf(tmp_path):
    proc = make_processor(tmp_path)
    image = structured_image(10, 2010, 0)
    with pytest.raises(ValueError, match="aspect ratio 201.0"):
        proc.process(prompt_with_images(1), [image], {})
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_image_processor(str(tmp_path))(images=[image], return_tensors="pt")


# --- config layouts ---------------------------------------------------------------------------


def save_hf_processor(path, **image_kwargs) -> None:
    """What transformers 5 `Qwen2VLProcessor.save_pretrained` writes (processor_config.json)."""
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image_pad|>", "<|video_pad|>"]})
    processor = transformers.Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
    processor.save_pretrained(path)


def test_reads_transformers5_processor_config(tmp_path):
    write_checkpoint(tmp_path)
    save_hf_processor(tmp_path, min_pixels=1000, max_pixels=200_000)
    assert "image_processor" in json.loads((tmp_path / "processor_config.json").read_text())
    assert not (tmp_path / "preprocessor_config.json").exists()
    proc = new_processor(make_model_config(str(tmp_path)))
    hf = hf_image_processor(str(tmp_path))
    assert (proc.settings.min_pixels, proc.settings.max_pixels) == (1000, 200_000)
    assert (hf.size.shortest_edge, hf.size.longest_edge) == (1000, 200_000)
    images = [structured_image(900, 700, 1), structured_image(20, 30, 2)]
    out = proc.process(prompt_with_images(2), images, {})
    assert_matches_hf(out.mm_features, hf(images=images, return_tensors="pt"))


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, (3136, 12845056)),
        ({"size": {"shortest_edge": 10, "longest_edge": 20}}, (3136, 12845056)),  # top level wins
    ],
)
def test_reads_hub_preprocessor_config(tmp_path, extra, expected):
    proc = make_processor(tmp_path, {"preprocessor_config.json": {**HUB_PREPROCESSOR, **extra}})
    hf = hf_image_processor(str(tmp_path))
    assert (proc.settings.min_pixels, proc.settings.max_pixels) == expected
    assert (hf.size.shortest_edge, hf.size.longest_edge) == expected


def test_size_only_hub_config_and_missing_files(tmp_path):
    size_only = {k: v for k, v in HUB_PREPROCESSOR.items() if not k.endswith("_pixels")}
    size_only["size"] = {"shortest_edge": 5000, "longest_edge": 300_000}
    proc = make_processor(tmp_path / "a", {"preprocessor_config.json": size_only})
    assert (proc.settings.min_pixels, proc.settings.max_pixels) == (5000, 300_000)
    proc = make_processor(tmp_path / "b", {"config_only.json": {}})
    hf_defaults = Qwen2VLImageProcessor().size
    assert proc.settings.min_pixels == hf_defaults.shortest_edge
    assert proc.settings.max_pixels == hf_defaults.longest_edge


def test_nested_processor_config_wins_over_preprocessor_config(tmp_path):
    nested = {"image_processor": {**HUB_PREPROCESSOR, "max_pixels": 400_000}}
    files = {"preprocessor_config.json": HUB_PREPROCESSOR, "processor_config.json": nested}
    proc = make_processor(tmp_path, files)
    assert proc.settings.max_pixels == hf_image_processor(str(tmp_path)).size.longest_edge
    assert proc.settings.max_pixels == 400_000


# --- placeholders and M-RoPE ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_models():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "qwen2_vl": Qwen2VLModel(tiny_qwen_vl_config("qwen2_vl")),
            "qwen2_5_vl": Qwen2_5_VLModel(tiny_qwen_vl_config("qwen2_5_vl")),
        }


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize(
    "sizes, trailing_text",
    [
        ([(300, 200)], True),
        ([(300, 200), (56, 900)], True),
        ([(1024, 768), (20, 30), (500, 120)], True),
        ([(400, 400), (100, 700)], False),
    ],
)
def test_mrope_positions_match_hf_get_rope_index(tmp_path, hf_models, family, sizes, trailing_text):
    proc = make_processor(tmp_path, family=family)
    images = [structured_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    out = proc.process(prompt_with_images(len(images), trailing_text), images, {})
    input_ids = torch.tensor([out.prompt_token_ids])  # [1, L]
    grids = torch.stack([f.data["image_grid_thw"] for f in out.mm_features])  # [N, 3]
    hf_positions, hf_delta = hf_models[family].get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == IMAGE_PAD).int(), image_grid_thw=grids
    )
    assert out.mrope_positions.dtype == torch.int64
    assert torch.equal(out.mrope_positions, hf_positions[:, 0])
    assert out.mrope_position_delta == hf_delta.item()
    for feature in out.mm_features:  # each placeholder range holds exactly its image tokens
        span = out.prompt_token_ids[feature.placeholder.offset : feature.placeholder.end]
        assert span == [IMAGE_PAD] * feature.num_embeds
        assert out.prompt_token_ids[feature.placeholder.offset - 1] == VISION_START
        assert out.prompt_token_ids[feature.placeholder.end] == VISION_END


def test_image_at_prompt_start_and_text_only_prompt(tmp_path, hf_models):
    proc = make_processor(tmp_path)
    image = structured_image(200, 300, 0)
    out = proc.process([IMAGE_PAD, 5, 6], [image], {})
    input_ids = torch.tensor([out.prompt_token_ids])
    grids = out.mm_features[0].data["image_grid_thw"][None]
    hf_positions, hf_delta = hf_models["qwen2_vl"].get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == IMAGE_PAD).int(), image_grid_thw=grids
    )
    assert torch.equal(out.mrope_positions, hf_positions[:, 0])
    assert out.mrope_position_delta == hf_delta.item()
    text = proc.process([1, 2, 3, 4], [], {})
    assert torch.equal(text.mrope_positions, torch.arange(4).expand(3, -1))
    assert text.mrope_position_delta == 0 and text.mm_features == []


def test_pre_expanded_prompt_is_kept(tmp_path):
    proc = make_processor(tmp_path)
    images = [structured_image(300, 200, 0), structured_image(90, 700, 1)]
    first = proc.process(prompt_with_images(2), images, {})
    again = proc.process(first.prompt_token_ids, images, {})
    assert again.prompt_token_ids == first.prompt_token_ids
    assert torch.equal(again.mrope_positions, first.mrope_positions)
    assert again.mrope_position_delta == first.mrope_position_delta
    assert [f.placeholder for f in again.mm_features] == [f.placeholder for f in first.mm_features]


def test_placeholder_errors(tmp_path):
    proc = make_processor(tmp_path)
    images = [structured_image(300, 200, i) for i in range(3)]  # 77 tokens each (11 x 7)
    msg = r"prompt has 2 image placeholders \(<\|image_pad\|>\) but 3 images were given"
    with pytest.raises(ValueError, match=msg):
        proc.process(prompt_with_images(2), images, {})
    with pytest.raises(ValueError, match="prompt has 1 image placeholders"):
        proc.process([1, IMAGE_PAD, IMAGE_PAD, 2], images[:2], {})  # adjacent pads: one run
    with pytest.raises(ValueError, match="run of 2"):
        proc.process([1, IMAGE_PAD, IMAGE_PAD, 2], images[:1], {})
    with pytest.raises(ValueError, match="video"):
        proc.process([1, VIDEO_PAD, IMAGE_PAD], images[:1], {})
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        proc.process([IMAGE_PAD], [images[0].float()], {})


def test_unknown_and_bad_kwargs(tmp_path):
    proc = make_processor(tmp_path)
    image = structured_image(100, 100, 0)
    with pytest.raises(ValueError, match=r"unknown mm_processor_kwargs \['fps'\].*min_pixels"):
        proc.process([IMAGE_PAD], [image], {"fps": 2})
    with pytest.raises(ValueError, match="positive int"):
        proc.process([IMAGE_PAD], [image], {"max_pixels": -1})
    with pytest.raises(ValueError, match="larger than"):
        proc.process([IMAGE_PAD], [image], {"min_pixels": 10**8})
    with pytest.raises(ValueError, match="unknown mm_processor_kwargs"):
        make_processor(tmp_path / "b", mm_processor_kwargs={"num_crops": 4})


def test_cache_processes_each_image_once(tmp_path):
    proc = make_processor(tmp_path)
    calls: list[int] = []
    preprocess = proc.preprocess
    proc.preprocess = lambda images, *a: calls.append(len(images)) or preprocess(images, *a)
    cat, dog = structured_image(300, 200, 0), structured_image(300, 200, 1)

    first = proc.process(prompt_with_images(3), [cat, dog, cat.clone()], {})
    assert calls == [2]  # the repeated image is computed once
    second = proc.process(prompt_with_images(1), [dog.clone()], {})
    assert calls == [2]  # hit: nothing computed
    assert second.mm_features[0].data["pixel_values"] is first.mm_features[1].data["pixel_values"]
    assert second.mm_features[0].mm_hash == first.mm_features[1].mm_hash
    assert first.mm_features[0].mm_hash == first.mm_features[2].mm_hash

    smaller = proc.process(prompt_with_images(1), [dog], {"max_pixels": 20_000})
    assert calls == [2, 1]  # other settings, other hash
    assert smaller.mm_features[0].mm_hash != second.mm_features[0].mm_hash
    assert len(proc.cache) == 3


def test_cache_is_bounded_by_bytes_and_evicts_lru(tmp_path):
    proc = make_processor(tmp_path)
    images = [structured_image(280, 280, i) for i in range(4)]  # 20 x 20 patches each
    entry_bytes = 400 * 3 * 2 * 14 * 14 * 4 + 3 * 8  # float32 pixels + int64 grid
    proc.cache.capacity_bytes = 2 * entry_bytes + 10  # room for two images
    a, b, c = (proc.process([IMAGE_PAD], [im], {}).mm_features[0].mm_hash for im in images[:3])
    assert len(proc.cache) == 2 and proc.cache.num_bytes == 2 * entry_bytes
    assert proc.cache.get(a) is None and proc.cache.get(b) is not None
    proc.process([IMAGE_PAD], [images[3]], {})  # evicts c: b was used more recently
    assert proc.cache.get(c) is None and proc.cache.get(b) is not None
    assert proc.cache.num_bytes <= proc.cache.capacity_bytes
