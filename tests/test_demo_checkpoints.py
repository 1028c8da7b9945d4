"""The demo tokenizer, images and tiny checkpoints: what every other test builds on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from vlmx.demo.checkpoint import (
    build_tiny_model,
    demo_images,
    demo_model_path,
    randomize_zero_params,
)
from vlmx.demo.images import structured_image
from vlmx.demo.tokenizer import QWEN2_TOKEN_IDS, QWEN_VL_CHAT_TEMPLATE

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
TWO_IMAGE_CHAT = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "First:"},
            {"type": "image"},
            {"type": "text", "text": "second:"},
            {"type": "image"},
            {"type": "text", "text": "Which is brighter?"},
        ],
    }
]


@pytest.fixture(scope="module")
def load_hf():
    """path -> (transformers model, processor), loaded once; fails on any missing weight."""
    loaded = {}

    def load(path: str):
        if path not in loaded:
            config = AutoConfig.from_pretrained(path)
            model_cls = getattr(transformers, config.architectures[0])
            model, info = model_cls.from_pretrained(path, output_loading_info=True)
            assert not any(info.values()), f"{path}: {info}"
            loaded[path] = model.eval(), AutoProcessor.from_pretrained(path)
        return loaded[path]

    return load


def _logits(model, processor, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = processor.apply_chat_template(TWO_IMAGE_CHAT, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    with torch.no_grad():
        return inputs["input_ids"][0], model(**inputs).logits[0]


def _weight_names(path: str) -> set[str]:
    names = set()
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_both_layouts_load_in_transformers_and_agree(family, request, test_images, load_hf):
    path = request.getfixturevalue(f"{family}_ckpt")
    hub_path = request.getfixturevalue(f"{family}_hub_ckpt")

    config = json.loads(Path(path, "config.json").read_text())
    assert "text_config" in config and "rope_scaling" not in config
    names = _weight_names(path)
    assert "model.language_model.embed_tokens.weight" in names
    assert "model.visual.patch_embed.proj.weight" in names

    hub_config = json.loads(Path(hub_path, "config.json").read_text())
    assert "text_config" not in hub_config and hub_config["model_type"] == family
    assert hub_config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    index = json.loads(Path(hub_path, "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    hub_names = _weight_names(hub_path)
    assert hub_names == set(index["weight_map"])
    assert {"model.embed_tokens.weight", "model.norm.weight", "visual.patch_embed.proj.weight"} <= (
        hub_names
    )
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in hub_names)
    assert "lm_head.weight" not in hub_names  # tied, as in the published 2B / 3B
    assert len(hub_names) == len(names)

    model, processor = load_hf(path)
    hub_model, hub_processor = load_hf(hub_path)
    images = test_images[:2]
    ids, logits = _logits(model, processor, images)
    hub_ids, hub_logits = _logits(hub_model, hub_processor, images)
    assert torch.equal(ids, hub_ids)
    torch.testing.assert_close(hub_logits, logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_token_ids_match_the_tokenizer(family, request, qwen_tokenizer):
    for layout in ("ckpt", "hub_ckpt"):
        path = request.getfixturevalue(f"{family}_{layout}")
        config = AutoConfig.from_pretrained(path)
        assert config.image_token_id == qwen_tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert config.video_token_id == qwen_tokenizer.convert_tokens_to_ids("<|video_pad|>")
        assert config.vision_start_token_id == QWEN2_TOKEN_IDS["<|vision_start|>"] == 151652
        assert config.vision_end_token_id == QWEN2_TOKEN_IDS["<|vision_end|>"] == 151653
        assert config.text_config.eos_token_id == qwen_tokenizer.eos_token_id == 151645
        assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
        tokenizer = AutoTokenizer.from_pretrained(path)
        text = "<|im_start|>user\nHi <|image_pad|> 12 ünï 😀<|im_end|>"
        assert tokenizer.encode(text) == qwen_tokenizer.encode(text)
        assert tokenizer.chat_template == QWEN_VL_CHAT_TEMPLATE


def test_tiny_model_has_no_zero_tensor_and_is_seeded():
    model = build_tiny_model("qwen2_5_vl", seed=0)
    for name, param in model.named_parameters():
        assert param.count_nonzero() > 0, name
    again = build_tiny_model("qwen2_5_vl", seed=0).state_dict()
    other = build_tiny_model("qwen2_5_vl", seed=1).state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    bias = "model.visual.blocks.0.attn.qkv.bias"  # zero in transformers' init, redrawn by seed
    assert not torch.equal(state[bias], other[bias])


def test_randomize_zero_params_keeps_norm_ones():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    torch.nn.init.zeros_(model[0].bias)
    assert randomize_zero_params(model, seed=0) == 2  # Linear bias and LayerNorm bias
    assert model[0].bias.count_nonzero() == 4 and model[1].bias.count_nonzero() == 4
    assert torch.equal(model[1].weight, torch.ones(4))


@pytest.mark.parametrize("family", FAMILIES)
def test_swapping_two_images_changes_the_logits(family, request, load_hf):
    model, processor = load_hf(request.getfixturevalue(f"{family}_ckpt"))
    # Same size, so that both orders give the same token ids and only the pixels move.
    a, b = structured_image(112, 84, variant=0), structured_image(112, 84, variant=3)
    ids, logits_ab = _logits(model, processor, [a, b])
    swapped_ids, logits_ba = _logits(model, processor, [b, a])
    assert torch.equal(ids, swapped_ids)
    first_image = int((ids == QWEN2_TOKEN_IDS["<|image_pad|>"]).nonzero()[0])
    torch.testing.assert_close(logits_ab[:first_image], logits_ba[:first_image])
    assert (logits_ab[-1] - logits_ba[-1]).abs().max() > 1e-3


# ---- tokenizer ---------------------------------------------------------------------------------

# Ids from tiktoken over qwen.tiktoken with Qwen's split regex (one digit per token).
KNOWN_IDS = {
    "Hello world!": [9707, 1879, 0],
    "What is in the image?": [3838, 374, 304, 279, 2168, 30],
    "Describe both pictures in 12 words.": [74785, 2176, 9185, 304, 220, 16, 17, 4244, 13],
    "你好，世界": [108386, 3837, 99489],
    " 2024-11-27\n\n": [220, 17, 15, 17, 19, 12, 16, 16, 12, 17, 22, 271],
}


def test_tokenizer_known_ids_and_special_tokens(qwen_tokenizer):
    tok = qwen_tokenizer
    for text, ids in KNOWN_IDS.items():
        assert tok.encode(text) == ids, text  # no BOS is added
    assert len(tok) == 151665
    for content, token_id in QWEN2_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(content) == token_id
        assert tok.encode(content) == [token_id]
    assert QWEN2_TOKEN_IDS["<|endoftext|>"] == 151643 and QWEN2_TOKEN_IDS["<|file_sep|>"] == 151664
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151645


@pytest.mark.parametrize(
    "text",
    [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>",
        "  two  spaces,\ttabs\r\nand CRLF  ",
        "café naïve 😀👍🏽 中文 русский 12345",
        '<tool_call>{"a": 1}</tool_call><|endoftext|>',
    ],
)
def test_tokenizer_round_trips(qwen_tokenizer, text):
    ids = qwen_tokenizer.encode(text)
    assert qwen_tokenizer.decode(ids) == text


def test_tokenizer_skips_special_but_keeps_tool_tokens(qwen_tokenizer):
    ids = qwen_tokenizer.encode("<|im_start|>assistant\n<tool_call>x</tool_call><|im_end|>")
    assert (
        qwen_tokenizer.decode(ids, skip_special_tokens=True)
        == "assistant\n<tool_call>x</tool_call>"
    )


def test_tokenizer_matches_tiktoken(qwen_tokenizer):
    tiktoken = pytest.importorskip("tiktoken")
    import importlib.resources

    from vlmx.demo.tokenizer import QWEN2_SPLIT_REGEX, load_qwen_ranks

    assert importlib.resources.files("qwen_tokenizer")  # the ranks come from this package
    encoding = tiktoken.Encoding(
        "qwen", pat_str=QWEN2_SPLIT_REGEX, mergeable_ranks=load_qwen_ranks(), special_tokens={}
    )
    texts = [
        "The quick brown fox jumps over the lazy dog's back; it's 3:45pm.",
        "def f(x):\n    return x ** 2  # square\n\n\n",
        "Ünïcödé, émojis 🤖🦆, 日本語のテキスト, العربية, 1234567890",
        "   leading and trailing   \n\t ",
        "URL: https://example.com/a/b?c=d&e=f#g  ",
    ]
    for text in texts:
        assert qwen_tokenizer.encode(text) == encoding.encode_ordinary(text), text


# ---- chat template -----------------------------------------------------------------------------


def test_chat_template_renders_images_where_they_are(qwen_tokenizer):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image"},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                {"type": "text", "text": "and"},
                {"image": "file.png"},
            ],
        },
        {"role": "assistant", "content": "Two ducks."},
        {"role": "user", "content": "Sure?"},
    ]
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\nLook:{vision}{vision}and{vision}<|im_end|>\n"
        "<|im_start|>assistant\nTwo ducks.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    rendered = qwen_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected

    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert qwen_tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_processor_chat_template_from_both_layouts(qwen2_5_vl_ckpt, qwen2_5_vl_hub_ckpt, load_hf):
    rendered = {
        load_hf(path)[1].apply_chat_template(TWO_IMAGE_CHAT, add_generation_prompt=True)
        for path in (qwen2_5_vl_ckpt, qwen2_5_vl_hub_ckpt)
    }
    assert len(rendered) == 1
    assert rendered.pop().count("<|vision_start|><|image_pad|><|vision_end|>") == 2


# ---- demo model and images ---------------------------------------------------------------------


def test_demo_model_path_is_built_once():
    path = demo_model_path()
    config = Path(path, "config.json")
    assert config.is_file() and Path(path, "model.safetensors.index.json").is_file()
    assert os.environ["VLMX_CACHE_DIR"] in path  # the session's cache, not the user's
    stamp = config.stat().st_mtime_ns
    assert demo_model_path() == path
    assert config.stat().st_mtime_ns == stamp
    leftovers = [p for p in Path(path).parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temp folder left behind


def test_demo_images_are_shipped():
    paths = demo_images()
    sizes = []
    for path in paths:
        assert os.path.getsize(path) < 60_000
        with Image.open(path) as image:
            assert image.mode == "RGB"
            sizes.append(image.size)
    assert sizes == [(640, 480), (480, 640)]


def test_structured_images_are_deterministic_and_distinct():
    a = structured_image(96, 64, variant=0)
    assert a.size == (96, 64) and a.mode == "RGB"
    assert a.tobytes() == structured_image(96, 64, variant=0).tobytes()
    b = structured_image(96, 64, variant=1)
    pixels_a, pixels_b = (
        torch.frombuffer(bytearray(i.tobytes()), dtype=torch.uint8) for i in (a, b)
    )
    assert (pixels_a.float() - pixels_b.float()).abs().mean() > 20
    with pytest.raises(ValueError, match="positive"):
        structured_image(0, 10)
