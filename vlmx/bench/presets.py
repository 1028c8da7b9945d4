"""Real-size models with random weights, for benchmarks without a download.

A preset is the published checkpoint's config (Qwen/Qwen2.5-VL-3B-Instruct, ...,
Qwen/Qwen3-VL-8B-Instruct), written as a hub-layout folder with the real Qwen tokenizer and no
weights; the engine fills the weights with
small random values (`load_format="dummy"`), as vLLM's dummy loader does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

from vlmx.bench.aria_preset import aria_config, write_aria_metadata
from vlmx.bench.llava_onevision_preset import (
    llava_onevision_qwen2_7b,
    write_llava_onevision_folder,
)
from vlmx.bench.mllama_preset import llama_3_2_11b_vision, write_mllama_preset
from vlmx.bench.phi4_preset import write_phi4_preset
from vlmx.demo.checkpoint import write_hub_metadata
from vlmx.demo.tokenizer import (
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    QWEN_VL_CHAT_TEMPLATE,
    build_once,
    qwen2_tokenizer_dir,
    vlmx_cache_dir,
)

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


def _qwen3_vl_8b() -> PretrainedConfig:
    """Qwen/Qwen3-VL-8B-Instruct's config.json (8.77B parameters)."""
    text = dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        bos_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    vision = dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        out_hidden_size=4096,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
        hidden_act="gelu_pytorch_tanh",
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        architectures=["Qwen3VLForConditionalGeneration"],
    )


def _write_qwen3_vl(config: PretrainedConfig, path: Path) -> None:
    """The published folder's files but the weights: the nested config.json of transformers 5,
    its image processor (patch 16, mean / std 0.5, 65536 to 16777216 pixels), the Qwen tokenizer
    and a Qwen-VL chat template."""
    config.save_pretrained(path)
    preprocessor = {
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    template = {"chat_template": QWEN_VL_CHAT_TEMPLATE}
    (path / "chat_template.json").write_text(json.dumps(template, indent=2))
    source = Path(qwen2_tokenizer_dir())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, path / name)


# name -> (family, config factory)
PRESETS = {
    "qwen2.5-vl-3b": ("qwen2_5_vl", lambda: _qwen2_5_vl(2048, 11008, 36, 16, 2, 151936, True)),
    "qwen2.5-vl-7b": ("qwen2_5_vl", lambda: _qwen2_5_vl(3584, 18944, 28, 28, 4, 152064, False)),
    "qwen2-vl-7b": ("qwen2_vl", _qwen2_vl_7b),
    "llava-onevision-qwen2-7b": ("llava_onevision", llava_onevision_qwen2_7b),
    "qwen3-vl-8b": ("qwen3_vl", _qwen3_vl_8b),
    "aria": ("aria", aria_config),
    "llama-3.2-11b-vision": ("mllama", llama_3_2_11b_vision),
    "phi-4-multimodal": ("phi4mm", None),  # its writer builds the config too
}
# family -> how its preset folder is written (default: the Qwen-VL hub files)
_FOLDER_WRITERS = {
    "llava_onevision": lambda config, _, folder: write_llava_onevision_folder(config, folder),
    "qwen3_vl": lambda config, _, folder: _write_qwen3_vl(config, folder),
    "aria": write_aria_metadata,
    "mllama": write_mllama_preset,
    "phi4mm": lambda _, __, folder: write_phi4_preset(folder),
}


def preset_path(name: str) -> str:
    """The preset's checkpoint folder (config, tokenizer, no weights), built once in the cache."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    family, make_config = PRESETS[name]

    def build(tmp: Path) -> None:
        config = make_config() if make_config is not None else None
        _FOLDER_WRITERS.get(family, write_hub_metadata)(config, family, tmp)

    return str(build_once(vlmx_cache_dir() / f"preset-{name}-v1", build))
