"""A tiny random Mllama checkpoint (transformers `MllamaForConditionalGeneration`).

Shaped like meta-llama/Llama-3.2-11B-Vision-Instruct (a Llama 3 decoder with llama3 RoPE and
gated cross-attention layers, a tiled vision tower with a gated global transformer and
intermediate layers), but small: 28 px tiles of 14 px patches (5 tokens per tile, padded to 8
inside the tower), up to 4 tiles, hidden 64, 4 decoder layers of which 1 and 3 cross-attend.
Every gate (zero at init in HF) is redrawn away from zero, so the images weigh on the logits.
The processor is HF's `MllamaProcessor` (the published image-processor settings but the tile
size, a small byte-level BPE tokenizer with Llama 3's special tokens and `<|image|>` at the
text vocabulary's size, a chat template in the published form).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor
from transformers import MllamaProcessor as HFMllamaProcessor

from tests.small_tokenizer import build_small_tokenizer
from vlmx.bench.mllama_preset import CHAT_TEMPLATE
from vlmx.demo.checkpoint import randomize_zero_params

MLLAMA_CHAT_TEMPLATE = CHAT_TEMPLATE  # the same template the bench preset ships

VOCAB_SIZE = 400  # the text vocabulary; <|image|> is id 400, one of the 8 rows past it
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
_BASE = VOCAB_SIZE + 1 - len(SPECIAL_TOKENS)
TOKEN_IDS = {t: _BASE + i for i, t in enumerate(SPECIAL_TOKENS)}
IMAGE_TOKEN_ID = TOKEN_IDS["<|image|>"]
assert IMAGE_TOKEN_ID == VOCAB_SIZE
TILE_SIZE = 28
MAX_TILES = 4
GATES = ("cross_attn_attn_gate", "cross_attn_mlp_gate", ".gate")


def tiny_mllama_config(cross_attention_layers=(1, 3), num_layers: int = 4) -> MllamaConfig:
    vision = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_global_layers=2,
        attention_heads=2,
        intermediate_size=64,
        image_size=TILE_SIZE,
        patch_size=14,
        max_num_tiles=MAX_TILES,
        intermediate_layers_indices=[0, 2],
        vision_output_dim=96,
        norm_eps=1e-5,
    )
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        cross_attention_layers=list(cross_attention_layers),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
        bos_token_id=TOKEN_IDS["<|begin_of_text|>"],
        eos_token_id=TOKEN_IDS["<|eot_id|>"],
        pad_token_id=TOKEN_IDS["<|end_of_text|>"],
    )
    return MllamaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        architectures=["MllamaForConditionalGeneration"],
    )


def build_mllama_processor() -> HFMllamaProcessor:
    tokenizer = build_small_tokenizer(
        VOCAB_SIZE + 1,
        SPECIAL_TOKENS,
        MLLAMA_CHAT_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        add_bos=True,
    )
    image_processor = MllamaImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        max_image_tiles=MAX_TILES,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=2,
    )
    return HFMllamaProcessor(image_processor, tokenizer, chat_template=MLLAMA_CHAT_TEMPLATE)


def build_mllama_checkpoint(folder, seed: int = 0, layout: str = "transformers") -> str:
    """Write a tiny random Mllama checkpoint into `folder`; returns its path.

    layout "transformers": `save_pretrained`'s names (the published ones: `vision_model.*`,
    `language_model.model.*`, ...); "modules": transformers' module names (`model.*`, `lm_head`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(tiny_mllama_config()).to(torch.float32)
    randomize_zero_params(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every gate well away from 0 (tanh(gate) scales a branch)
        for name, param in model.named_parameters():
            if name.endswith(GATES):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    model.eval().save_pretrained(folder)
    build_mllama_processor().save_pretrained(folder)
    if layout == "modules":
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    elif layout != "transformers":
        raise ValueError(f"unknown layout {layout!r}")
    return str(folder)
