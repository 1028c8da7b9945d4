"""A tiny random Gemma 3 checkpoint (transformers-native `Gemma3ForConditionalGeneration`).

Shaped like google/gemma-3-4b-it but small: a SigLIP tower at 32 px with 4 px patches (8 x 8
patches, average-pooled 2 x 2 to 16 tokens per image), a 2-layer Gemma 3 decoder (one sliding
layer with a 24-token window, one global layer with linear RoPE scaling, as the 4B has), hidden
64. The processor is HF's `Gemma3Processor` (Gemma3ImageProcessor, a small byte-level BPE
tokenizer holding Gemma's special tokens, a chat template in Gemma 3's format).

Two layouts:
- "transformers": `save_pretrained(save_original_format=False)`: module names
  (`model.language_model.*`, `model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`);
- "hub": the names google/gemma-3-4b-it publishes (`language_model.model.*`,
  `vision_tower.vision_model.*`, `multi_modal_projector.*`, no lm_head), which transformers 5
  converts on load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    GenerationConfig,
)

from tests import small_tokenizer
from tests.small_tokenizer import build_small_tokenizer
from vlmx.demo.checkpoint import randomize_zero_params

# Gemma 3's chat template, written for these tests in the published format: bos, turns as
# <start_of_turn>role\n ... <end_of_turn>\n, "assistant" shown as "model", a system message
# prefixed to the first user turn, <start_of_image> per image item.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

VOCAB_SIZE = 512
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
TOKEN_IDS = {t: VOCAB_SIZE - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
IMAGE_SIZE = 32
MM_TOKENS = 16
SLIDING_WINDOW = 24


def tiny_gemma3_config() -> Gemma3Config:
    ids = TOKEN_IDS
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": SLIDING_WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
        "max_position_embeddings": 4096,
        "pad_token_id": ids["<pad>"],
        "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
        "bos_token_id": ids["<bos>"],
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 4,
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,
    }
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


# NOTE: Gemma's real vocabulary has tokens for runs of newlines ("\n\n", "\n\n\n", ...), so
# the "\n\n" around each image merges with neighbouring newlines; text with such runs is added
# to the tiny tokenizer's training corpus so that its BPE learns the same kind of merges.
_NEWLINE_CORPUS = ["user\n\n\nA\n\n\n\nB\n\n C \n\n\n\n\n D\n\n"] * 8


def build_gemma3_tokenizer():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(small_tokenizer, "_CORPUS", small_tokenizer._CORPUS + _NEWLINE_CORPUS)
        tokenizer = _build_tokenizer()
    # Gemma3Processor reads these attributes (tokenizer_config.json keys of the real tokenizer).
    tokenizer._set_model_specific_special_tokens(
        {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        }
    )
    return tokenizer


def _build_tokenizer():
    return build_small_tokenizer(
        VOCAB_SIZE,
        SPECIAL_TOKENS,
        GEMMA3_CHAT_TEMPLATE,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        add_bos=True,
    )


def build_gemma3_model(seed: int = 0, tied: bool = True) -> Gemma3ForConditionalGeneration:
    config = tiny_gemma3_config()
    if not tied:
        config.tie_word_embeddings = False
        config.text_config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    # NOTE: the projection and every (1 + w) RMSNorm start at zero in HF; redraw them all.
    randomize_zero_params(model, seed + 1, std=0.1)
    return model


def build_gemma3_checkpoint(
    path: str | Path, layout: str = "transformers", seed: int = 0, tied: bool = True
) -> str:
    """Write a complete tiny checkpoint folder (weights, config, processor) and return it.

    `tied=False` gives the model an `lm_head` of its own (the published ones tie it)."""
    if layout not in ("transformers", "hub"):
        raise ValueError(f"unknown layout {layout!r}; use 'transformers' or 'hub'")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_gemma3_model(seed, tied)
    ids = TOKEN_IDS
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        pad_token_id=ids["<pad>"],
    )
    model.save_pretrained(path, save_original_format=False)
    if layout == "hub":
        _rename_to_hub(path)
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=2,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=build_gemma3_tokenizer(),
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS,
    )
    processor.save_pretrained(path)
    return str(path)


_HUB_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _rename_to_hub(path: Path) -> None:
    """Weights under the names google/gemma-3-*-it publish (tied lm_head absent)."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    renamed = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            if tensors["model.language_model.embed_tokens.weight"] is tensor or torch.equal(
                tensors["model.language_model.embed_tokens.weight"], tensor
            ):
                continue
            name = "language_model.lm_head.weight"
        for old, new in _HUB_NAMES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        renamed[name] = tensor
    save_file(renamed, file, metadata={"format": "pt"})
