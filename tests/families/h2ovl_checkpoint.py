"""A tiny random H2OVL-Mississippi checkpoint in the published `h2ovl_chat` layout.

Shaped like h2oai/h2ovl-mississippi-800m (InternViT with layer scale, pixel shuffle 0.5 v2, the
`mlp1` LayerNorm + Linear-GELU-Linear projector, a Llama decoder), but small: 112 px tiles of
14 px patches (16 tokens per tile), hidden 64, 2 layers each. Built as transformers'
`InternVLForConditionalGeneration` (the reference) with random weights, its tensors renamed to
the published names (fused `attn.qkv`, `ls1`, `norm1`, `mlp1.N`, `vision_model.*`; the mapping
of transformers' InternVL conversion, reversed) and config.json written with the published
fields. The tokenizer: a small byte-level BPE with H2OVL's special tokens, its files as
`save_pretrained` writes them (tokenizer.json / tokenizer_config.json), Danube's chat template
with image parts written as vLLM's InternVL-style prompts (`Image-i: <image>\n`) and a leading
`<s>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

from tests.small_tokenizer import build_small_tokenizer
from vlmx.demo.checkpoint import randomize_zero_params

H2OVL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set ns = namespace(text='', n=0) %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set ns.n = ns.n + 1 %}"
    "{% set ns.text = ns.text + 'Image-' + ns.n|string + ': <image>\n' %}"
    "{% elif part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}{% endif %}"
    "{% endfor %}{% set text = ns.text %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<|prompt|>' + text + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>' + text + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|answer|>' + text + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|answer|>' }}{% endif %}"
    "{% endfor %}"
)

VOCAB_SIZE = 400
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<|prompt|>",
    "<|answer|>",
    "<|system|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "<ref>",
    "<box>",
]
_BASE = VOCAB_SIZE - len(SPECIAL_TOKENS)
TOKEN_IDS = {t: _BASE + i for i, t in enumerate(SPECIAL_TOKENS)}
IMG_CONTEXT_ID = TOKEN_IDS["<IMG_CONTEXT>"]
TILE_SIZE = 112
IMAGE_SEQ_LENGTH = (TILE_SIZE // 14) ** 2 // 4
MAX_DYNAMIC_PATCH = 6  # the published config's


def tiny_vision() -> dict:
    """The published InternViT fields (`vision_config`), small."""
    return dict(
        architectures=["InternVisionModel"],
        model_type="intern_vit_6b",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=TILE_SIZE,
        patch_size=14,
        num_channels=3,
        qkv_bias=True,
        qk_normalization=False,
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        use_flash_attn=False,
        dropout=0.0,
        drop_path_rate=0.0,
        attention_dropout=0.0,
        initializer_factor=0.1,
    )


def tiny_llm() -> dict:
    """The published `llm_config` fields (a Llama decoder), small."""
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=TOKEN_IDS["<s>"],
        eos_token_id=TOKEN_IDS["</s>"],
        pad_token_id=TOKEN_IDS["<unk>"],
    )


def published_config() -> dict:
    """config.json as the published h2ovl_chat checkpoints write it (small)."""
    return dict(
        architectures=["H2OVLChatModel"],
        auto_map={
            "AutoConfig": "configuration_h2ovl_chat.H2OVLChatConfig",
            "AutoModel": "modeling_h2ovl_chat.H2OVLChatModel",
            "AutoModelForCausalLM": "modeling_h2ovl_chat.H2OVLChatModel",
        },
        model_type="h2ovl_chat",
        vision_config=tiny_vision(),
        llm_config=tiny_llm(),
        downsample_ratio=0.5,
        force_image_size=TILE_SIZE,
        select_layer=-1,
        ps_version="v2",
        template="h2ogpt2",
        dynamic_image_size=True,
        use_thumbnail=True,
        use_msac=True,
        min_dynamic_patch=1,
        max_dynamic_patch=MAX_DYNAMIC_PATCH,
        use_backbone_lora=0,
        use_llm_lora=0,
        torch_dtype="bfloat16",
    )


def reference_config() -> InternVLConfig:
    """The same network as transformers' InternVL (the test's reference model)."""
    vision = tiny_vision()
    return InternVLConfig(
        vision_config=dict(
            hidden_size=vision["hidden_size"],
            num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"],
            intermediate_size=vision["intermediate_size"],
            image_size=TILE_SIZE,
            patch_size=14,
            attention_bias=True,
            use_qk_norm=False,
            norm_type="layer_norm",
            layer_norm_eps=1e-6,
            use_mean_pooling=True,
            hidden_act="gelu",
        ),
        text_config=tiny_llm(),
        image_token_id=IMG_CONTEXT_ID,
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


_LAYER_NAMES = {
    "attention.projection_layer": "attn.proj",
    "lambda_1": "ls1",
    "lambda_2": "ls2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_EMBEDDING_NAMES = {
    "cls_token": "class_embedding",
    "position_embeddings": "position_embedding",
    "patch_embeddings.projection.weight": "patch_embedding.weight",
    "patch_embeddings.projection.bias": "patch_embedding.bias",
}
_PROJECTOR_NAMES = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}


def published_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers InternVL module names -> the published H2OVL names (q/k/v fused)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("model.language_model."):
            out["language_model.model." + name[len("model.language_model.") :]] = tensor
        elif name == "lm_head.weight":
            out["language_model.lm_head.weight"] = tensor
        elif name.startswith("model.multi_modal_projector."):
            module, param = name[len("model.multi_modal_projector.") :].split(".")
            out[f"mlp1.{_PROJECTOR_NAMES[module]}.{param}"] = tensor
        elif name.startswith("model.vision_tower.embeddings."):
            rest = name[len("model.vision_tower.embeddings.") :]
            out["vision_model.embeddings." + _EMBEDDING_NAMES[rest]] = tensor
        else:
            prefix = "model.vision_tower.encoder.layer."
            assert name.startswith(prefix), name
            index, _, rest = name[len(prefix) :].partition(".")
            layer = f"vision_model.encoder.layers.{index}."
            if rest.startswith("attention.q_proj."):
                param = rest.rpartition(".")[2]
                parts = [state[f"{prefix}{index}.attention.{p}_proj.{param}"] for p in "qkv"]
                out[f"{layer}attn.qkv.{param}"] = torch.cat(parts)
            elif rest.startswith(("attention.k_proj.", "attention.v_proj.")):
                continue
            else:
                module, _, param = rest.rpartition(".")
                if not module:  # layer scale: a bare parameter
                    out[layer + _LAYER_NAMES[param]] = tensor
                else:
                    out[f"{layer}{_LAYER_NAMES[module]}.{param}"] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def build_reference_model(seed: int = 0) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(reference_config()).to(torch.float32)
    randomize_zero_params(model, seed)
    with torch.no_grad():  # layer scale away from its constant init, so a lost ls1 shows
        for name, param in model.named_parameters():
            if ".lambda_" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def build_h2ovl_checkpoint(folder, seed: int = 0, reference_folder=None) -> str:
    """Write the published-layout checkpoint into `folder` (and, if given, the same weights as
    a transformers InternVL checkpoint into `reference_folder`); returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_reference_model(seed)
    if reference_folder is not None:
        model.save_pretrained(reference_folder)
    state = published_weights(model.state_dict())
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(published_config(), indent=2))
    tokenizer = build_small_tokenizer(
        VOCAB_SIZE,
        SPECIAL_TOKENS,
        H2OVL_CHAT_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        unk_token="<unk>",
        add_bos=False,  # the template writes <s> (chat prompts are encoded without specials)
    )
    tokenizer.save_pretrained(folder)
    for extra in ("chat_template.jinja",):  # the published repo keeps it in tokenizer_config
        path = folder / extra
        if path.exists():
            config_path = folder / "tokenizer_config.json"
            tok_config = json.loads(config_path.read_text())
            tok_config["chat_template"] = path.read_text()
            config_path.write_text(json.dumps(tok_config, indent=2))
            path.unlink()
    generation = {"bos_token_id": TOKEN_IDS["<s>"], "eos_token_id": TOKEN_IDS["</s>"]}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return str(folder)
