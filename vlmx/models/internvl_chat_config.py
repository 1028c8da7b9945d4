"""The published InternVL config.json (model_type "internvl_chat", `InternVLChatModel`, e.g.
OpenGVLab/InternVL2-2B), read as transformers' `InternVLConfig` without running the folder's code.

The published file nests the tower's settings under `vision_config` (InternViT names:
`qkv_bias`, `qk_normalization`, `norm_type`, ...) and the decoder's under `llm_config`
(`InternLM2ForCausalLM`, `Qwen2ForCausalLM` or `LlamaForCausalLM`); the top level holds
`downsample_ratio`, `ps_version`, `select_layer`, `template` and the tiling defaults
(`max_dynamic_patch`, `min_dynamic_patch`, `use_thumbnail`, `force_image_size`).

InternLM2 is a Llama decoder (RMSNorm, SwiGLU, GQA, no biases) under other weight names; its
`rope_scaling` {"type": "dynamic"} rescales RoPE only for sequences longer than
`max_position_embeddings`, so up to that length it is plain RoPE, which vlmx runs.
NOTE: beyond `max_position_embeddings` vlmx keeps plain RoPE (the engine warns there).
"""

from __future__ import annotations

from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
    "norm_type",
)
# llm_config architecture -> (transformers config class, <IMG_CONTEXT> id of the published vocab)
_TEXT_MODELS = {
    "InternLM2ForCausalLM": (LlamaConfig, 92546),
    "LlamaForCausalLM": (LlamaConfig, 92546),
    "Qwen2ForCausalLM": (Qwen2Config, 151667),
}


def _text_config(llm: dict) -> tuple[LlamaConfig | Qwen2Config, int]:
    arch = (llm.get("architectures") or ["?"])[0]
    if arch not in _TEXT_MODELS:
        raise ValueError(
            f"InternVL with a {arch!r} language model is not supported by vlmx; supported: "
            f"{', '.join(_TEXT_MODELS)}"
        )
    if arch == "InternLM2ForCausalLM" and llm.get("bias", False):
        raise ValueError("llm_config bias=true (InternLM2 with q/k/v/o biases) is not supported")
    cls, image_token_id = _TEXT_MODELS[arch]
    fields = {k: llm[k] for k in _TEXT_FIELDS if k in llm}
    scaling = llm.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "dynamic"):
        raise ValueError(f"llm_config rope_scaling type {kind!r} is not supported by vlmx")
    return cls(**fields), image_token_id


def _vision_config(vision: dict) -> InternVLVisionConfig:
    fields = {k: vision[k] for k in _VISION_FIELDS if k in vision}
    return InternVLVisionConfig(
        **fields,
        attention_bias=vision.get("qkv_bias", True),
        use_qk_norm=vision.get("qk_normalization", False),
        use_absolute_position_embeddings=True,
        use_mean_pooling=False,
    )


def read_published_config(raw: dict) -> InternVLConfig:
    """config.json of the published layout -> `InternVLConfig` (its text_config a Llama or
    Qwen2 config); `image_token_id` is <IMG_CONTEXT>'s id in the published vocabulary."""
    missing = [key for key in ("vision_config", "llm_config") if not raw.get(key)]
    if missing:
        raise ValueError(
            f"config.json of model_type 'internvl_chat' has no {' / '.join(missing)}; is the "
            "checkpoint complete (the published InternVLChatModel config nests both)?"
        )
    if raw.get("ps_version", "v2") != "v2":
        raise ValueError(
            f"ps_version {raw['ps_version']!r} is not supported; vlmx runs the 'v2' pixel shuffle"
        )
    text, image_token_id = _text_config(raw["llm_config"])
    vision = _vision_config(raw["vision_config"])
    ratio = raw.get("downsample_ratio", 0.5)
    side = vision.image_size[0] // vision.patch_size[0]  # patches per side of a tile
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=raw.get("image_token_id", image_token_id),
        downsample_ratio=ratio,
        image_seq_length=int(side * side * ratio * ratio),  # the published num_image_token
        vision_feature_layer=raw.get("select_layer", -1),
        projector_hidden_act="gelu",
        architectures=raw["architectures"],
    )
    config.tie_word_embeddings = bool(raw["llm_config"].get("tie_word_embeddings", False))
    config.llm_architecture = raw["llm_config"]["architectures"][0]
    config.max_dynamic_patch = raw.get("max_dynamic_patch", 12)
    config.min_dynamic_patch = raw.get("min_dynamic_patch", 1)
    return config
