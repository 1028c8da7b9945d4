"""A tiny random InternVL checkpoint (transformers-native `InternVLForConditionalGeneration`).

Shaped like OpenGVLab/InternVL3-2B-hf (InternViT with layer scale, pixel shuffle 0.5, LayerNorm +
Linear-GELU-Linear projector, Qwen2 decoder with q/k/v bias), but small: 112 px tiles of 14 px
patches (8 x 8 patches, 16 tokens per tile after the pixel shuffle), hidden 64, 2 layers each.
The processor is HF's `InternVLProcessor` (GotOcr2 image processor with the ImageNet mean/std,
a small byte-level BPE tokenizer with InternVL's special tokens, InternVL3-hf's chat template).

Two layouts:
- "transformers": `save_pretrained` of transformers 5.24, which writes the names of the published
  InternVL3-hf checkpoints (`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
  `language_model.lm_head.*`) and processor_config.json;
- "hub": the module names of transformers >= 4.52 (`model.vision_tower.*`,
  `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`), as checkpoints saved
  by those versions hold them, with a flat preprocessor_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
)

from tests.small_tokenizer import build_small_tokenizer
from vlmx.demo.checkpoint import randomize_zero_params

# The chat template of OpenGVLab/InternVL3-*-hf: one <IMG_CONTEXT> line per image part.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

VOCAB_SIZE = 400
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
]
_BASE = VOCAB_SIZE - len(SPECIAL_TOKENS)
TOKEN_IDS = {t: _BASE + i for i, t in enumerate(SPECIAL_TOKENS)}
IMG_CONTEXT_ID = TOKEN_IDS["<IMG_CONTEXT>"]
IMG_START_ID = TOKEN_IDS["<img>"]
IMG_END_ID = TOKEN_IDS["</img>"]
TILE_SIZE = 112
IMAGE_SEQ_LENGTH = (TILE_SIZE // 14) ** 2 // 4  # tokens per tile after the 0.5 pixel shuffle

# HF GotOcr2 image processor settings of the InternVL3-hf checkpoints (tile size shrunk).
IMAGE_PROCESSOR_KWARGS = dict(
    size={"height": TILE_SIZE, "width": TILE_SIZE},
    image_mean=[0.485, 0.456, 0.406],
    image_std=[0.229, 0.224, 0.225],
    do_resize=True,
    do_rescale=True,
    do_normalize=True,
    do_convert_rgb=True,
    resample=3,
    crop_to_patches=False,  # as the published preprocessor configs; InternVLProcessor turns it on
    min_patches=1,
    max_patches=12,
)


def tiny_internvl_config(**vision_overrides) -> InternVLConfig:
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=TILE_SIZE,
        patch_size=14,
        attention_bias=True,
        use_qk_norm=False,
        norm_type="layer_norm",
        use_mean_pooling=True,
        hidden_act="gelu",
        layer_scale_init_value=0.1,
    )
    vision.update(vision_overrides)
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
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMG_CONTEXT_ID,
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
    )


def build_internvl_processor(tmp_folder: Path) -> InternVLProcessor:
    """HF InternVLProcessor with the small tokenizer (its named image tokens set as HF's are)."""
    fast = build_small_tokenizer(
        VOCAB_SIZE,
        SPECIAL_TOKENS,
        INTERNVL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok_dir = Path(tmp_folder) / "tokenizer"
    fast.save_pretrained(tok_dir)
    config_path = tok_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["extra_special_tokens"] = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    config_path.write_text(json.dumps(tok_config))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    assert tokenizer.context_image_token_id == IMG_CONTEXT_ID
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(**IMAGE_PROCESSOR_KWARGS),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=IMAGE_SEQ_LENGTH,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def build_internvl_checkpoint(folder, layout: str = "transformers", seed: int = 0, **vision) -> str:
    """Write a tiny random InternVL checkpoint into `folder`; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(tiny_internvl_config(**vision)).to(torch.float32)
    randomize_zero_params(model, seed)
    with torch.no_grad():  # layer scale away from its constant init, so a lost lambda shows
        for name, param in model.named_parameters():
            if ".lambda_" in name:
                param.uniform_(0.5, 1.5)
    model.eval().save_pretrained(folder)
    processor = build_internvl_processor(folder / "_build")
    processor.save_pretrained(folder)
    if layout == "hub":
        _to_hub_layout(folder, processor)
    elif layout != "transformers":
        raise ValueError(f"unknown layout {layout!r}")
    return str(folder)


_HUB_RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def _to_hub_layout(folder: Path, processor: InternVLProcessor) -> None:
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
