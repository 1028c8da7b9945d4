"""A tiny random InternVL checkpoint in the published `InternVLChatModel` layout (as
OpenGVLab/InternVL2-2B ships it: model_type "internvl_chat", `vision_config` / `llm_config`,
`vision_model.*` / `mlp1.*` / InternLM2 `language_model.*` weights, a CLIP-style
preprocessor_config.json), and its transformers-native twin, the HF reference.

The twin is transformers' `InternVLForConditionalGeneration` with a Llama decoder (InternLM2's
math) built tiny with random weights; the published folder holds the same weights under the
published names (the public mapping of transformers' convert_internvl_weights_to_hf, inverted:
q/k/v packed into InternLM2's `wqkv` per KV group, the tower's into `attn.qkv`).
NOTE: the tokenizer is the small byte-level BPE of `internvl_checkpoint` (tokenizer.json), not
a SentencePiece tokenizer.model; config.json carries `image_token_id` for its small vocabulary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

from tests.families.internvl_checkpoint import (
    IMAGE_SEQ_LENGTH,
    IMG_CONTEXT_ID,
    TILE_SIZE,
    TOKEN_IDS,
    VOCAB_SIZE,
    build_internvl_processor,
)
from vlmx.demo.checkpoint import randomize_zero_params

# InternVL2-2B's chat template (internlm2-chat), string contents
INTERNLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=TILE_SIZE,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    norm_type="layer_norm",
)
TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    bos_token_id=TOKEN_IDS["<|endoftext|>"],
    eos_token_id=TOKEN_IDS["<|im_end|>"],
    pad_token_id=TOKEN_IDS["<|endoftext|>"],
)


def published_config() -> dict:
    """config.json as the published repo writes it (the tiny sizes)."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": TILE_SIZE,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internlm2-chat",
        "use_thumbnail": True,
        "image_token_id": IMG_CONTEXT_ID,  # NOTE: not published; the small vocabulary's id
        "vision_config": {
            **VISION,
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "qkv_bias": True,
            "qk_normalization": False,
            "drop_path_rate": 0.0,
            "initializer_factor": 1.0,
        },
        "llm_config": {
            **TEXT,
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "bias": False,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
        },
    }


def _hf_config() -> InternVLConfig:
    return InternVLConfig(
        vision_config={**VISION, "attention_bias": True, "use_mean_pooling": False},
        text_config={**TEXT, "model_type": "llama"},
        image_token_id=IMG_CONTEXT_ID,
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
    )


_VISION_NAMES = (  # native -> published, applied in order
    (r"^vision_tower\.", "vision_model."),
    (r"\.layer\.", ".layers."),
    (r"\.cls_token$", ".class_embedding"),
    (r"\.position_embeddings$", ".position_embedding"),
    (r"\.patch_embeddings\.projection\.", ".patch_embedding."),
    (r"\.lambda_(\d)$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
)
_TEXT_NAMES = (
    (r"^language_model\.lm_head\.", "language_model.output."),
    (r"\.embed_tokens\.", ".tok_embeddings."),
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
)
_PROJECTOR_NAMES = {"layer_norm": "mlp1.0", "linear_1": "mlp1.1", "linear_2": "mlp1.3"}


def _rename(name: str, rules) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def to_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-native (save_pretrained) names -> the published ones, q/k/v packed."""
    out: dict[str, torch.Tensor] = {}
    heads, kv_heads = TEXT["num_attention_heads"], TEXT["num_key_value_heads"]
    head_dim = TEXT["hidden_size"] // heads
    for name, tensor in state.items():
        if name.startswith("vision_tower."):
            if ".attention.k_proj." in name or ".attention.v_proj." in name:
                continue
            new = _rename(name, _VISION_NAMES)
            if ".attn.q_proj." in new:
                parts = [state[name.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
                out[new.replace(".q_proj.", ".qkv.")] = torch.cat(parts)
                continue
            out[new] = tensor
        elif name.startswith("multi_modal_projector."):
            module, rest = name[len("multi_modal_projector.") :].split(".", 1)
            out[f"{_PROJECTOR_NAMES[module]}.{rest}"] = tensor
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        elif ".self_attn.q_proj." in name:
            q, k, v = (state[name.replace(".q_proj.", f".{p}_proj.")] for p in "qkv")
            hidden = q.shape[1]
            groups = torch.cat(
                [
                    q.reshape(kv_heads, heads // kv_heads, head_dim, hidden),
                    k.reshape(kv_heads, 1, head_dim, hidden),
                    v.reshape(kv_heads, 1, head_dim, hidden),
                ],
                dim=1,
            )  # [kv_heads, q_per_kv + 2, head_dim, hidden]
            new = _rename(name, _TEXT_NAMES).replace(".self_attn.q_proj.", ".attention.wqkv.")
            out[new] = groups.reshape(-1, hidden)
        else:
            out[_rename(name, _TEXT_NAMES)] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def build_internvl_chat_checkpoints(folder, seed: int = 0) -> tuple[str, str]:
    """Write the published-layout checkpoint and its transformers-native twin (same weights)
    under `folder`; returns (published path, native path)."""
    folder = Path(folder)
    published, native = folder / "published", folder / "native"
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(_hf_config()).to(torch.float32)
    randomize_zero_params(model, seed)
    with torch.no_grad():  # layer scale away from its constant init, so a lost ls1/ls2 shows
        for name, param in model.named_parameters():
            if ".lambda_" in name:
                param.uniform_(0.5, 1.5)
    model.eval().save_pretrained(native)
    processor = build_internvl_processor(folder / "_build")
    processor.image_processor.crop_to_patches = True
    processor.save_pretrained(native)

    published.mkdir(parents=True)
    state = load_file(native / "model.safetensors")  # the published -hf names
    save_file(to_published(state), published / "model.safetensors", metadata={"format": "pt"})
    (published / "config.json").write_text(json.dumps(published_config(), indent=2))
    preprocessor = {  # InternVL2-2B's, the tile size shrunk
        "crop_size": TILE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "size": TILE_SIZE,
    }
    (published / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    tokenizer = processor.tokenizer
    tokenizer.chat_template = INTERNLM2_CHAT_TEMPLATE
    tokenizer.save_pretrained(published)
    return str(published), str(native)
