"""A tiny random Aria checkpoint (transformers' `AriaForConditionalGeneration`, model_type aria).

Shaped like rhymes-ai/Aria but small: an Idefics3-style SigLIP tower of 2 layers at hidden 32
with 70 px patches (a 980 px canvas is 14 x 14 patches, a 490 px one 7 x 7), the projector's
learned queries {49 patches: 32, 196 patches: 128} (the processor's size_conversion {490: 32,
980: 128}; pixels per image token within 2x of the published 256 per 980 px crop, so that
images worth a token budget stay small), and a 2-layer MoE decoder at hidden 64: 6 experts of
intermediate 32, top-2, one shared expert. The tokenizer is a small byte-level BPE holding
Aria's special tokens (`<|img|>`, `<fim_prefix>`, `<fim_suffix>`, `<|im_start|>`,
`<|im_end|>`), with an Aria-style chat template written for these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AriaConfig,
    AriaForConditionalGeneration,
    AriaImageProcessor,
    AriaProcessor,
    AutoTokenizer,
    GenerationConfig,
)

from tests.small_tokenizer import build_small_tokenizer
from vlmx.demo.checkpoint import randomize_zero_params

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_suffix>"]
SPECIAL_TOKENS += ["<|img|>"]
IDS = {t: VOCAB_SIZE - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
IMAGE_TOKEN_ID = IDS["<|img|>"]
SIZE_CONVERSION = {490: 32, 980: 128}
PATCH_TO_QUERY = {49: 32, 196: 128}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<fim_prefix><|img|><fim_suffix>\n{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config() -> AriaConfig:
    text = {
        "model_type": "aria_text",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "max_position_embeddings": 4096,
        "moe_num_experts": 6,
        "moe_topk": 2,
        "moe_num_shared_experts": 1,
        "bos_token_id": IDS["<|im_start|>"],
        "eos_token_id": IDS["<|im_end|>"],
        "pad_token_id": IDS["<|endoftext|>"],
    }
    vision = {
        "model_type": "idefics3_vision",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 980,
        "patch_size": 70,
        "layer_norm_eps": 1e-6,
    }
    return AriaConfig(
        text_config=text,
        vision_config=vision,
        projector_patch_to_query_dict=dict(PATCH_TO_QUERY),
        image_token_index=IMAGE_TOKEN_ID,
        tie_word_embeddings=False,
        architectures=["AriaForConditionalGeneration"],
    )


def build_tokenizer(folder: Path):
    fast = build_small_tokenizer(
        VOCAB_SIZE,
        SPECIAL_TOKENS,
        CHAT_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok_dir = Path(folder) / "tokenizer-src"
    fast.save_pretrained(tok_dir)
    config_path = tok_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["extra_special_tokens"] = {"image_token": "<|img|>"}
    config_path.write_text(json.dumps(tok_config))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    assert tokenizer.image_token_id == IMAGE_TOKEN_ID
    return tokenizer


def build_processor(folder: Path) -> AriaProcessor:
    return AriaProcessor(
        image_processor=AriaImageProcessor(),
        tokenizer=build_tokenizer(folder),
        chat_template=CHAT_TEMPLATE,
        size_conversion=dict(SIZE_CONVERSION),
    )


def build_model(seed: int = 0) -> AriaForConditionalGeneration:
    torch.manual_seed(seed)
    model = AriaForConditionalGeneration(tiny_config()).eval()
    randomize_zero_params(model, seed)
    # NOTE: at the default init (std 0.02) the tiny decoder's logits are nearly flat; a larger
    # scale makes attention peaked and the router decisive, so a wrong position, mask, routing
    # or image order shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "norm" not in name:
                param.mul_(10.0)
    return model


def build_checkpoint(folder: str | Path, seed: int = 0) -> str:
    """Save a tiny Aria model with its processor into `folder`; returns the path."""
    folder = Path(folder)
    model = build_model(seed)
    model.generation_config = GenerationConfig(
        bos_token_id=IDS["<|im_start|>"],
        eos_token_id=IDS["<|im_end|>"],
        pad_token_id=IDS["<|endoftext|>"],
    )
    model.save_pretrained(folder)
    build_processor(folder / "src").save_pretrained(folder)
    return str(folder)
