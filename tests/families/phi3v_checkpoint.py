"""A tiny random Phi-3.5-vision checkpoint in the published layout (model_type phi3_v).

Built from transformers' `CLIPVisionModel` (336 px crops of 14 px patches, as the published
CLIP ViT-L/14-336, but hidden 32 and 3 layers) and `Phi3ForCausalLM` (hidden 64, 2 layers, 4
heads of 16, 2 KV heads, LongRoPE "su" factors, untied lm_head), plus the HD embedding's
parameters (`glb_GN`, `sub_GN` 4 * 32 wide, `img_projection.{0,2}`), saved under the published
names:

```
model.embed_tokens / model.layers.* / model.norm / lm_head      (Phi3ForCausalLM's own names)
model.vision_embed_tokens.img_processor.vision_model.*          (CLIPVisionModel's)
model.vision_embed_tokens.{glb_GN, sub_GN, img_projection.0.*, img_projection.2.*}
```

config.json holds the published fields (flat Phi-3 fields, rope_scaling type "su",
`embd_layer`, `img_processor`, auto_map) plus `vision_config` (the tiny tower's sizes) and
`image_token_id` (the placeholder id of the small vocabulary); preprocessor_config.json the
published image processor's (num_crops 4, num_img_tokens 144, OpenAI CLIP mean / std); the
`*_phi3_v.py` files auto_map names raise when imported (nothing may run them).
`load_reference_modules` maps the names back onto the HF modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

from tests.small_tokenizer import build_small_tokenizer
from vlmx.demo.checkpoint import randomize_zero_params

# One <|image_i|> per image part, numbered through the conversation, newline-separated (the
# prompt form of vLLM's example); the published template takes text content only.
PHI3V_CHAT_TEMPLATE = (
    "{% set ns = namespace(n=0) %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set ns.n = ns.n + 1 %}"
    "{{ '<|image_' + ns.n|string + '|>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
VOCAB_SIZE = 400
SPECIAL_TOKENS = ["<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|image|>"]
_BASE = VOCAB_SIZE - len(SPECIAL_TOKENS)
TOKEN_IDS = {t: _BASE + i for i, t in enumerate(SPECIAL_TOKENS)}
IMAGE_TOKEN_ID = TOKEN_IDS["<|image|>"]
HEAD_DIM = 16
SHORT_FACTOR = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5]
LONG_FACTOR = [1.0, 1.5, 3.0, 6.0, 12.0, 24.0, 30.0, 40.0]
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
EMBED = "model.vision_embed_tokens."
# the published folder's own code, which vlmx must never import
REMOTE_CODE = (
    "configuration_phi3_v.py",
    "modeling_phi3_v.py",
    "image_processing_phi3_v.py",
    "processing_phi3_v.py",
)
TOWER = EMBED + "img_processor."


def tiny_text_config() -> Phi3Config:
    return Phi3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "su", "short_factor": SHORT_FACTOR, "long_factor": LONG_FACTOR},
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=TOKEN_IDS["<s>"],
        eos_token_id=[TOKEN_IDS["<|endoftext|>"], TOKEN_IDS["<|end|>"]],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
        sliding_window=262144,
    )


class HDEmbedding(nn.Module):
    """The published `Phi3HDImageEmbedding`'s own parameters (the tower aside)."""

    def __init__(self, vision_dim: int, hidden: int) -> None:
        super().__init__()
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * vision_dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * vision_dim))
        self.img_projection = nn.Sequential(
            nn.Linear(4 * vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )


def build_reference_modules(seed: int = 0) -> tuple[CLIPVisionModel, HDEmbedding, Phi3ForCausalLM]:
    torch.manual_seed(seed)
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION)).float().eval()
    text = Phi3ForCausalLM(tiny_text_config()).float().eval()
    hd = HDEmbedding(VISION["hidden_size"], text.config.hidden_size).eval()
    for i, module in enumerate((clip, text, hd)):
        randomize_zero_params(module, seed + i)
    with torch.no_grad():
        for name, p in hd.named_parameters():  # separators and projection that images can move
            p.normal_(0.0, 0.5 if "GN" in name else 0.2)
        for name, p in text.named_parameters():  # the layers, not the last token, decide
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(3.0)
    return clip, hd, text


def tiny_published_config() -> dict:
    text = tiny_text_config()
    fields = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
        "original_max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window",
    )  # fmt: skip
    return {
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "auto_map": {
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
        **{k: getattr(text, k) for k in fields},
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": SHORT_FACTOR, "long_factor": LONG_FACTOR},
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "img_processor": {
            "image_dim_out": VISION["hidden_size"],
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
        },
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
        "vision_config": VISION,  # the tiny tower (published: CLIP ViT-L/14-336, hard-coded)
        "image_token_id": IMAGE_TOKEN_ID,  # published: <|image|> 32044
    }


PREPROCESSOR = {
    "auto_map": {
        "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
    },
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Phi3VImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "num_crops": 4,
    "num_img_tokens": 144,
    "processor_class": "Phi3VProcessor",
}


def build_phi3v_tokenizer():
    return build_small_tokenizer(
        VOCAB_SIZE,
        SPECIAL_TOKENS,
        PHI3V_CHAT_TEMPLATE,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        add_bos=True,
    )


def build_phi3v_checkpoint(folder, seed: int = 0) -> str:
    """Write the tiny checkpoint into `folder`; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip, hd, text = build_reference_modules(seed)
    weights = {k: v for k, v in text.state_dict().items()}
    weights |= {TOWER + k: v for k, v in clip.state_dict().items()}
    weights |= {EMBED + k: v for k, v in hd.state_dict().items()}
    weights = {k: v.contiguous().clone() for k, v in weights.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(tiny_published_config(), indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": TOKEN_IDS["<s>"], "eos_token_id": tiny_text_config().eos_token_id}
        )
    )
    build_phi3v_tokenizer().save_pretrained(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    # the published tokenizer_config.json's class and bos rule (tokenizer.json still decides)
    tokenizer_config |= {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}
    tokenizer_config["add_eos_token"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    for name in REMOTE_CODE:  # what auto_map names: running any of it fails loudly
        (folder / name).write_text(f"raise RuntimeError({name!r} + ' must never run')\n")
    return str(folder)


def load_reference_modules(path: str) -> tuple[CLIPVisionModel, HDEmbedding, Phi3ForCausalLM]:
    """The checkpoint's published names mapped back onto the HF modules (strict)."""
    weights = load_file(str(Path(path) / "model.safetensors"))
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION)).float().eval()
    text = Phi3ForCausalLM(tiny_text_config()).float().eval()
    hd = HDEmbedding(VISION["hidden_size"], text.config.hidden_size).eval()
    parts: dict[str, dict] = {"clip": {}, "hd": {}, "text": {}}
    for name, tensor in weights.items():
        if name.startswith(TOWER):
            parts["clip"][name[len(TOWER) :]] = tensor
        elif name.startswith(EMBED):
            parts["hd"][name[len(EMBED) :]] = tensor
        else:
            parts["text"][name] = tensor
    clip.load_state_dict(parts["clip"], strict=True)
    hd.load_state_dict(parts["hd"], strict=True)
    text.load_state_dict(parts["text"], strict=True)
    return clip, hd, text


def tiny_phi3v_config():
    """The tiny checkpoint's config as vlmx reads it (the published layout's reader)."""
    from vlmx.models.phi3v_config import read_published_config

    return read_published_config(tiny_published_config())
