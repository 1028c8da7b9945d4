"""Tiny random Idefics3 and SmolVLM checkpoints (transformers-native classes).

Shaped like HuggingFaceM4/Idefics3-8B-Llama3 and HuggingFaceTB/SmolVLM-256M-Instruct but small:

- idefics3: SigLIP-style tower at 32 px with 4 px patches (8 x 8 patches), pixel shuffle 2 ->
  16 tokens per tile; images resized to a longest edge of 96, so up to 3 x 3 tiles + a global view.
- smolvlm: tower at 64 px with 4 px patches (16 x 16), pixel shuffle 4 (as SmolVLM-256M) -> 16
  tokens per tile; longest edge 128, up to 2 x 2 tiles + a global view.

Both: a 2-layer Llama decoder at hidden 64 (GQA 4 / 2 heads), a small byte-level BPE tokenizer
holding the family's special tokens (`<fake_token_around_image>`, `<image>`, `<global-img>`,
`<row_i_col_j>`, `<end_of_utterance>`), the family's chat template, HF's processor. Idefics3's
tokenizer prepends bos like Llama 3's; SmolVLM's does not (like SmolLM2's). transformers 5 and
the hub use the same weight names for these families, so one layout covers both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)

from tests.small_tokenizer import build_small_tokenizer
from vlmx.demo.checkpoint import randomize_zero_params


def chat_template(bos: str) -> str:
    """The Idefics3 / SmolVLM format, written for these tests: `User:<image>question
    <end_of_utterance>\\nAssistant:` (": " after the role unless the turn opens with an image)."""
    return (
        bos + "{%- for message in messages -%}"
        "{{ message['role'] | capitalize }}"
        "{%- if message['content'] is string -%}{{ ': ' + message['content'] }}"
        "{%- else -%}"
        "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- elif part['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{ '<end_of_utterance>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    )


VOCAB_SIZE = 512
IMAGE_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
]
FAMILIES = {
    # family: (bos, eos, other specials, tile side, scale factor, longest edge, add_bos)
    "idefics3": ("<|begin_of_text|>", "<|end_of_text|>", ["<|finetune_pad|>"], 32, 2, 96, True),
    "smolvlm": ("<|im_start|>", "<|endoftext|>", ["<|im_end|>"], 64, 4, 128, False),
}
IMAGE_SEQ_LEN = 16


def special_tokens(family: str) -> list[str]:
    bos, eos, others, *_ = FAMILIES[family]
    return [bos, eos, *others, *IMAGE_TOKENS]


def token_ids(family: str) -> dict[str, int]:
    tokens = special_tokens(family)
    return {t: VOCAB_SIZE - len(tokens) + i for i, t in enumerate(tokens)}


def tiny_config(family: str):
    bos, eos, _, side, scale, _, _ = FAMILIES[family]
    ids = token_ids(family)
    text = {
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100_000.0},
        "max_position_embeddings": 4096,
        "bos_token_id": ids[bos],
        "eos_token_id": ids[eos],
        "pad_token_id": ids[eos],
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": side,
        "patch_size": 4,
        "layer_norm_eps": 1e-6,
    }
    config_cls = Idefics3Config if family == "idefics3" else SmolVLMConfig
    return config_cls(
        text_config=text,
        vision_config=vision,
        scale_factor=scale,
        image_token_id=ids["<image>"],
        pad_token_id=ids[eos],
        tie_word_embeddings=family == "smolvlm",
    )


def build_tokenizer(family: str):
    bos, eos, _, _, _, _, add_bos = FAMILIES[family]
    return build_small_tokenizer(
        VOCAB_SIZE,
        special_tokens(family),
        chat_template(bos),
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        add_bos=add_bos,
    )


def build_processor(family: str):
    _, _, _, side, _, longest_edge, _ = FAMILIES[family]
    tokenizer = build_tokenizer(family)
    kwargs = {"size": {"longest_edge": longest_edge}, "max_image_size": {"longest_edge": side}}
    if family == "idefics3":
        return Idefics3Processor(
            image_processor=Idefics3ImageProcessor(**kwargs),
            tokenizer=tokenizer,
            image_seq_len=IMAGE_SEQ_LEN,
            chat_template=tokenizer.chat_template,
        )
    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(**kwargs),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=tokenizer.chat_template,
    )


def build_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(family)
    model_cls = (
        Idefics3ForConditionalGeneration
        if family == "idefics3"
        else SmolVLMForConditionalGeneration
    )
    model = model_cls(config).eval()
    randomize_zero_params(model, seed)
    # NOTE: at the default init (std 0.02) the tiny decoder's logits are nearly flat; a larger
    # scale makes attention peaked, so a wrong position, mask or image order shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "norm" not in name:
                param.mul_(10.0)
    return model


def build_checkpoint(folder: str | Path, family: str, seed: int = 0) -> str:
    """Save a tiny `family` model with its processor into `folder`; returns the path."""
    folder = Path(folder)
    model = build_model(family, seed)
    ids = token_ids(family)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.text_config.bos_token_id,
        eos_token_id=[model.config.text_config.eos_token_id, ids["<end_of_utterance>"]],
        pad_token_id=model.config.text_config.pad_token_id,
    )
    model.save_pretrained(folder)
    build_processor(family).save_pretrained(folder)
    return str(folder)
