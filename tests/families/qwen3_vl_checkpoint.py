"""A tiny random Qwen3-VL checkpoint (transformers-native `Qwen3VLForConditionalGeneration`).

Shaped like Qwen/Qwen3-VL-8B-Instruct (16 px patches, merge 2, learned position table resampled
to each grid, GELU-tanh ViT blocks, DeepStack mergers; a Qwen3 decoder with q/k norms and
interleaved M-RoPE), but small: vision hidden 32 over 3 blocks with DeepStack on blocks 0 and 1,
an 8 x 8 position table, a 3-layer decoder of hidden 64 (head_dim 16, sections [4, 2, 2]).
The processor is HF's `Qwen3VLProcessor` over `Qwen2VLImageProcessor` (patch 16, mean / std 0.5,
as the published preprocessor config), a small byte-level BPE tokenizer with Qwen's special
tokens, and the image / video / text part of Qwen3-VL's chat template. `save_pretrained` writes
the published names (`model.language_model.*`, `model.visual.*`, `lm_head.*`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from tests.small_tokenizer import build_small_tokenizer
from vlmx.demo.checkpoint import randomize_zero_params

# Qwen3-VL's chat template, reduced to what vlmx's prompts use (no tools / reasoning parts).
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

VOCAB_SIZE = 400
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_BASE = VOCAB_SIZE - len(SPECIAL_TOKENS)
TOKEN_IDS = {t: _BASE + i for i, t in enumerate(SPECIAL_TOKENS)}
IMAGE_TOKEN_ID = TOKEN_IDS["<|image_pad|>"]
VIDEO_TOKEN_ID = TOKEN_IDS["<|video_pad|>"]
PATCH = 16
MERGE = 2
FACTOR = PATCH * MERGE  # both sides of a resized image are multiples of it
# 4 to 64 merged tokens per image: small images, fast tests.
MIN_PIXELS = FACTOR * FACTOR * 4
MAX_PIXELS = FACTOR * FACTOR * 64
IMAGE_PROCESSOR_KWARGS = dict(
    patch_size=PATCH,
    merge_size=MERGE,
    temporal_patch_size=2,
    size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)


def tiny_qwen3_vl_config(**vision_overrides) -> Qwen3VLConfig:
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
        hidden_act="gelu_pytorch_tanh",
    )
    vision.update(vision_overrides)
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        bos_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=TOKEN_IDS["<|im_end|>"],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
    )
    return Qwen3VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
        tie_word_embeddings=False,
        architectures=["Qwen3VLForConditionalGeneration"],
    )


def build_qwen3_vl_processor() -> Qwen3VLProcessor:
    tokenizer = build_small_tokenizer(
        VOCAB_SIZE,
        SPECIAL_TOKENS,
        QWEN3_VL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**IMAGE_PROCESSOR_KWARGS),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=PATCH, merge_size=MERGE),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def build_qwen3_vl_model(seed: int = 0, **vision) -> Qwen3VLForConditionalGeneration:
    """The HF model of `tiny_qwen3_vl_config`: float32, seeded, no all-zero tensor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config(**vision))
    model = model.to(torch.float32).eval()
    randomize_zero_params(model, seed + 1)
    return model


def build_qwen3_vl_checkpoint(folder, seed: int = 0, **vision) -> str:
    """Write a tiny random Qwen3-VL checkpoint into `folder`; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_qwen3_vl_model(seed, **vision).save_pretrained(folder)
    build_qwen3_vl_processor().save_pretrained(folder)
    return str(folder)
