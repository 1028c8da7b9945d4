"""A tiny random Phi-4-multimodal checkpoint, in transformers' layout and the published one.

Shaped like microsoft/Phi-4-multimodal-instruct but small: the SigLIP-NaViT tower keeps its 448 px
crops of 14 px patches (HF's image processor counts tokens for 32 x 32 patches per crop) with
hidden 32 and 3 layers (features read at layer -2); the Phi-4-mini decoder has hidden 64, 2
layers, 4 heads of 16 (2 KV heads), partial rotary 0.75 with LongRoPE factors, tied embeddings.
The speech tower is tiny too (transformers always builds it; vlmx skips its weights).

Layouts:
- "transformers": `save_pretrained` of `Phi4MultimodalForCausalLM` (model_type phi4_multimodal);
- "published": the same weights under the published names (model_type phi4mm,
  `Phi4MMForCausalLM`): flat Phi-3 config fields with `rope_scaling` {type: longrope} and
  `embd_layer`, `glb_GN` / `sub_GN` / `img_projection.{0,2}`, the decoder's linear layers
  wrapped as PEFT wraps them (`*.base_layer.weight` beside baked-in `lora_A` / `lora_B`
  tensors, which must be ignored), a `vision_config` dict with the tiny tower's sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Phi4MultimodalConfig,
    Phi4MultimodalForCausalLM,
    Phi4MultimodalImageProcessor,
)

from tests.small_tokenizer import build_small_tokenizer
from vlmx.demo.checkpoint import randomize_zero_params

# One <|image_i|> per image part, numbered through the conversation (vLLM's phi4_mm form).
PHI4_CHAT_TEMPLATE = (
    "{% set ns = namespace(n=0) %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set ns.n = ns.n + 1 %}"
    "{{ '<|image_' + ns.n|string + '|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

VOCAB_SIZE = 400
# Phi-4's special tokens (published ids: 199999, 200010, 200011, 200019, 200020, 200021, 200022)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|endoftext10|>",  # the image placeholder
    "<|endoftext11|>",  # the audio placeholder
    "<|assistant|>",
    "<|end|>",
    "<|user|>",
    "<|system|>",
]
_BASE = VOCAB_SIZE - len(SPECIAL_TOKENS)
TOKEN_IDS = {t: _BASE + i for i, t in enumerate(SPECIAL_TOKENS)}
IMAGE_TOKEN_ID = TOKEN_IDS["<|endoftext10|>"]
HEAD_DIM = 16
ROTARY_DIM = int(HEAD_DIM * 0.75)
SHORT_FACTOR = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5]
LONG_FACTOR = [1.0, 1.5, 3.0, 6.0, 12.0, 24.0]
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=448,
    patch_size=14,
    crop_size=448,
    feature_layer=-2,
    image_token_id=IMAGE_TOKEN_ID,
)
AUDIO = dict(
    hidden_size=16,
    intermediate_size=32,
    num_blocks=1,
    num_attention_heads=2,
    ext_pw_out_channel=16,
    depthwise_separable_out_channel=16,
    nemo_conv_channels=16,
    audio_token_id=TOKEN_IDS["<|endoftext11|>"],
)


def tiny_phi4mm_config(dynamic_rope: bool = True) -> Phi4MultimodalConfig:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    if dynamic_rope:
        rope.update(rope_type="longrope", short_factor=SHORT_FACTOR, long_factor=LONG_FACTOR)
        rope["original_max_position_embeddings"] = 4096
    return Phi4MultimodalConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters=rope,
        tie_word_embeddings=True,
        bos_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=[TOKEN_IDS["<|endoftext|>"], TOKEN_IDS["<|end|>"]],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
        vision_config=VISION,
        audio_config=AUDIO,
        architectures=["Phi4MultimodalForCausalLM"],
    )


def build_phi4mm_tokenizer():
    return build_small_tokenizer(
        VOCAB_SIZE,
        SPECIAL_TOKENS,
        PHI4_CHAT_TEMPLATE,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def build_phi4mm_model(seed: int = 0) -> Phi4MultimodalForCausalLM:
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(tiny_phi4mm_config()).to(torch.float32)
    randomize_zero_params(model, seed)  # the separators and biases start at zero
    with torch.no_grad():  # HF inits the tower with N(0, 1) weights: tame it so images matter
        for name, param in model.named_parameters():
            if ".img_processor." in name and param.ndim == 2:
                param.mul_(0.2)
            # the layers, not the tied embedding of the last token, decide the next token (at
            # HF's init the tiny decoder repeats <|assistant|>, which decodes to no text)
            if name.startswith("model.layers.") and name.endswith(
                ("o_proj.weight", "down_proj.weight")
            ):
                param.mul_(3.0)
    return model.eval()


# The published vision-lora's targets: the decoder's fused layers (r=256, alpha=512 there)
VISION_LORA_MODULES = (
    r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"
)


def write_vision_lora(model: Phi4MultimodalForCausalLM, out: Path, seed: int = 7) -> str:
    """A PEFT adapter of the decoder's fused layers saved to `out` (as the published
    `vision-lora/`), its weights random: PEFT starts B at zero, which would test nothing."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=VISION_LORA_MODULES)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(out)
    return str(out)


def build_phi4mm_checkpoint(folder, layout: str = "transformers", seed: int = 0) -> str:
    """Write a tiny random Phi-4-multimodal checkpoint into `folder`, with its `vision-lora/`
    adapter folder beside the weights as published; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_phi4mm_model(seed)
    model.save_pretrained(folder)
    write_vision_lora(model, folder / "vision-lora")
    build_phi4mm_tokenizer().save_pretrained(folder)
    Phi4MultimodalImageProcessor().save_pretrained(folder)
    if layout == "published":
        _to_published_layout(folder)
    elif layout != "transformers":
        raise ValueError(f"unknown layout {layout!r}")
    return str(folder)


_IMAGE = "model.embed_tokens_extend.image_embed."
_PUBLISHED_RENAMES = (
    (_IMAGE + "global_img_feature_extensor", _IMAGE + "glb_GN"),
    (_IMAGE + "sub_img_feature_extensor", _IMAGE + "sub_GN"),
    (_IMAGE + "img_projection_up.", _IMAGE + "img_projection.0."),
    (_IMAGE + "img_projection_down.", _IMAGE + "img_projection.2."),
)
_LORA_WRAPPED = (".qkv_proj.weight", ".o_proj.weight", ".gate_up_proj.weight", ".down_proj.weight")


def _to_published_layout(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(1)
    for name, tensor in weights.items():
        for old, new in _PUBLISHED_RENAMES:
            if name.startswith(old):
                name = new + name[len(old) :]
        if name.startswith("model.layers.") and name.endswith(_LORA_WRAPPED):
            stem = name[: -len("weight")]
            out[stem + "base_layer.weight"] = tensor.contiguous()
            for adapter in ("vision", "speech"):  # baked-in adapters: to be ignored
                out[f"{stem}lora_A.{adapter}.weight"] = torch.randn(
                    4, tensor.shape[1], generator=generator
                )
                out[f"{stem}lora_B.{adapter}.weight"] = torch.randn(
                    tensor.shape[0], 4, generator=generator
                )
            continue
        out[name] = tensor.contiguous()
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    rope = config["rope_parameters"]
    published = {
        "architectures": ["Phi4MMForCausalLM"],
        "model_type": "phi4mm",
        **{
            k: config[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "hidden_act",
                "max_position_embeddings",
                "original_max_position_embeddings",
                "rms_norm_eps",
                "tie_word_embeddings",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
            )
        },
        "rope_theta": rope["rope_theta"],
        "partial_rotary_factor": rope["partial_rotary_factor"],
        "rope_scaling": {
            "type": "longrope",
            "short_factor": rope["short_factor"],
            "long_factor": rope["long_factor"],
        },
        "sliding_window": 262144,
        "img_processor": None,
        "embd_layer": {
            "embedding_cls": "image_audio",
            "image_embd_layer": {
                "crop_size": 448,
                "embedding_cls": "tune_image",
                "hd_transform_order": "sub_glb",
                "image_token_compression_cls": "avg_pool_2d",
                "projection_cls": "mlp",
                "use_hd_transform": True,
                "with_learnable_separator": True,
            },
            "audio_embd_layer": {"embedding_cls": "audio"},
        },
        "vision_lora": {
            "dp": 0.0,
            "layer": "layers.*((self_attn\\.(qkv_proj|o_proj))|(mlp\\.(gate_up|down)_proj))",
            "lora_alpha": 8,
            "r": 4,
        },
        "speech_lora": {
            "dp": 0.01,
            "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))",
            "lora_alpha": 8,
            "r": 4,
        },
        "auto_map": {"AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM"},
        "vision_config": VISION,  # the tiny tower (and its image token id; published: 200010)
    }
    (folder / "config.json").write_text(json.dumps(published, indent=2))
