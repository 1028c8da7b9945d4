"""Configs of tiny Qwen-VL models: the real architecture at toy width, for the demo and tests."""

from __future__ import annotations

from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen2VLConfig

QWEN2_VOCAB_SIZE = 151936  # the published checkpoints' embedding rows (ids 151643+ are special)


def tiny_qwen_vl_config(family: str, vocab_size: int = QWEN2_VOCAB_SIZE) -> PretrainedConfig:
    """A Qwen2-VL (`family="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`) config, hidden 64, 2 layers.

    head_dim 16 -> M-RoPE sections [2, 3, 3] (sum = head_dim / 2), as [16, 24, 24] is for 128.
    """
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [2, 3, 3],
        },
        tie_word_embeddings=True,
    )
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            window_size=112,
            fullatt_block_indexes=[1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    raise ValueError(f"unknown tiny family {family!r}; use 'qwen2_vl' or 'qwen2_5_vl'")
