"""A tiny random LLaVA-OneVision checkpoint (`LlavaOnevisionForConditionalGeneration`).

Shaped like llava-hf/llava-onevision-qwen2-7b-ov-hf (SigLIP tower without head, features of its
last layer before `post_layernorm`, 2-layer GELU projector, `image_newline`, a Qwen2 decoder with
q/k/v bias, AnyRes tiling), but small: 56 px tiles of 14 px patches (4 x 4 = 16 features per
tile), grid pinpoints up to 3 x 3 tiles, hidden 64, 2 layers each. `vision_aspect_ratio` is
`anyres_max_4` by default, so that grids of more than ~4 tiles are scaled down bilinearly (the
published `anyres_max_9` does the same at 9).

The processor is HF's `LlavaOnevisionProcessor` (its image processor with the published mean/std
of 0.5, a small byte-level BPE tokenizer with the family's special tokens, the published chat
template). Two layouts:
- "transformers": `save_pretrained` of transformers 5, which writes the published names
  (`vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`,
  `language_model.model.*`, `language_model.lm_head.*`) and processor_config.json;
- "hub": the module names of transformers >= 4.52 (`model.vision_tower.*`, `model.image_newline`,
  `model.language_model.*`, `lm_head.*`), with a flat preprocessor_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from tests.small_tokenizer import build_small_tokenizer
from vlmx.bench.llava_onevision_preset import CHAT_TEMPLATE
from vlmx.demo.checkpoint import randomize_zero_params

LLAVA_ONEVISION_CHAT_TEMPLATE = CHAT_TEMPLATE  # the same template the bench preset ships

VOCAB_SIZE = 400
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
_BASE = VOCAB_SIZE - len(SPECIAL_TOKENS)
TOKEN_IDS = {t: _BASE + i for i, t in enumerate(SPECIAL_TOKENS)}
IMAGE_TOKEN_ID = TOKEN_IDS["<image>"]
VIDEO_TOKEN_ID = TOKEN_IDS["<video>"]
TILE_SIZE = 56
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (TILE_SIZE // PATCH_SIZE) ** 2  # features per tile
# (height, width) of the canvases an image may be tiled into: up to 3 x 3 tiles
PINPOINTS = [[TILE_SIZE * r, TILE_SIZE * c] for r in (1, 2, 3) for c in (1, 2, 3)]
MEAN = STD = [0.5, 0.5, 0.5]


def tiny_llava_onevision_config(
    vision_aspect_ratio: str = "anyres_max_4", **overrides
) -> LlavaOnevisionConfig:
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    text = dict(
        model_type="qwen2",
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=TOKEN_IDS["<|im_end|>"],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
    )
    fields = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=False,
        architectures=["LlavaOnevisionForConditionalGeneration"],
    )
    fields.update(overrides)
    return LlavaOnevisionConfig(**fields)


def build_llava_onevision_processor(
    tmp_folder: Path, config: LlavaOnevisionConfig
) -> LlavaOnevisionProcessor:
    """HF LlavaOnevisionProcessor with the small tokenizer, its settings from `config`."""
    fast = build_small_tokenizer(
        VOCAB_SIZE,
        SPECIAL_TOKENS,
        LLAVA_ONEVISION_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok_dir = Path(tmp_folder) / "tokenizer"
    fast.save_pretrained(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        image_mean=MEAN,
        image_std=STD,
        resample=3,
        do_pad=True,
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )


def build_llava_onevision_checkpoint(
    folder, layout: str = "transformers", seed: int = 0, **config_overrides
) -> str:
    """Write a tiny random LLaVA-OneVision checkpoint into `folder`; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_llava_onevision_config(**config_overrides)
    model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32)
    randomize_zero_params(model, seed)
    with torch.no_grad():  # the newline embedding at the scale of the image features
        model.model.image_newline.normal_(0.0, 1.0)
    model.eval().save_pretrained(folder)
    processor = build_llava_onevision_processor(folder / "_build", config)
    processor.save_pretrained(folder)
    if layout == "hub":
        _to_hub_layout(folder)
    elif layout != "transformers":
        raise ValueError(f"unknown layout {layout!r}")
    return str(folder)


_HUB_RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)


def _to_hub_layout(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    renamed = {}
    for name, tensor in weights.items():
        for old, new in _HUB_RENAMES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        renamed[name] = tensor.contiguous()
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    nested = folder / "processor_config.json"
    data = json.loads(nested.read_text())
    image_processor = data.pop("image_processor")
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    nested.write_text(json.dumps(data, indent=2))
