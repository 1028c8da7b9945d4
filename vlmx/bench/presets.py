"""Real-size models with random weights, for benchmarks without a download.

A preset is the published checkpoint's config (Qwen/Qwen2.5-VL-3B-Instruct, ...), written as a
hub-layout folder with the real Qwen tokenizer and no weights; the engine fills the weights with
small random values (`load_format="dummy"`), as vLLM's dummy loader does.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen2VLConfig

from vlmx.bench.phi4_preset import write_phi4_preset
from vlmx.demo.checkpoint import write_hub_metadata
from vlmx.demo.tokenizer import build_once, vlmx_cache_dir

_QWEN_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}


def _qwen2_5_vl(hidden, intermediate, layers, heads, kv_heads, vocab, tied) -> PretrainedConfig:
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters=_QWEN_ROPE,
        tie_word_embeddings=tied,
    )
    vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=hidden,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)


def _qwen2_vl_7b() -> PretrainedConfig:
    text = dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters=_QWEN_ROPE,
        tie_word_embeddings=False,
    )
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


# name -> (family, config factory)
PRESETS = {
    "qwen2.5-vl-3b": ("qwen2_5_vl", lambda: _qwen2_5_vl(2048, 11008, 36, 16, 2, 151936, True)),
    "qwen2.5-vl-7b": ("qwen2_5_vl", lambda: _qwen2_5_vl(3584, 18944, 28, 28, 4, 152064, False)),
    "qwen2-vl-7b": ("qwen2_vl", _qwen2_vl_7b),
    "phi-4-multimodal": ("phi4mm", None),  # written by WRITERS
}
# presets whose folder is written by their own function (not a Qwen hub layout)
WRITERS = {"phi-4-multimodal": write_phi4_preset}


def preset_path(name: str) -> str:
    """The preset's checkpoint folder (config, tokenizer, no weights), built once in the cache."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    family, make_config = PRESETS[name]

    def build(tmp: Path) -> None:
        if name in WRITERS:
            WRITERS[name](tmp)
        else:
            write_hub_metadata(make_config(), family, tmp)

    return str(build_once(vlmx_cache_dir() / f"preset-{name}-v1", build))
