"""Tiny random Pixtral (Llava) and Mistral 3 checkpoints, in the two folder layouts in the wild.

```
layout="transformers"  (transformers 5 save_pretrained of the model and the PixtralProcessor)
  config.json, model.safetensors, generation_config.json, processor_config.json,
  chat_template.jinja, tokenizer.json, tokenizer_config.json

layout="hub"  (mistral-community/pixtral-12b, mistralai/Mistral-Small-3.1-24B-Instruct-2503)
  config.json                 rope_theta in text_config / vision_config (no rope_parameters)
  model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
                              language_model.model.*, language_model.lm_head.weight,
                              vision_tower.*, multi_modal_projector.*
  preprocessor_config.json, processor_config.json (token names, patch_size,
  spatial_merge_size), chat_template.json, tokenizer.json, tokenizer_config.json
```

The Mistral 3 model keeps Mistral3Config's default tie_word_embeddings=True: its transformers
layout has no lm_head (tied), and its hub layout carries an lm_head of its own, as
Mistral-Small-3.1 does (HF then unties).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
)

from tests.small_tokenizer import build_small_tokenizer
from vlmx.demo.checkpoint import randomize_zero_params

VOCAB_SIZE = 384
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]
TOKEN_IDS = {t: VOCAB_SIZE - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
IMG, IMG_BREAK, IMG_END = TOKEN_IDS["[IMG]"], TOKEN_IDS["[IMG_BREAK]"], TOKEN_IDS["[IMG_END]"]

# (vision patch_size, spatial_merge_size, longest_edge, vision hidden_act)
SETTINGS = {"llava": (8, 1, 64, "silu"), "mistral3": (7, 2, 98, "gelu")}
ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
}
HF_CLASSES = {"llava": LlavaForConditionalGeneration, "mistral3": Mistral3ForConditionalGeneration}

_CONTENT = (
    '{%- if message["content"] is string %}{{- message["content"] }}{%- else %}'
    '{%- for chunk in message["content"] %}'
    '{%- if chunk["type"] == "text" %}{{- chunk["text"] }}'
    '{%- elif chunk["type"] == "image" %}{{- "[IMG]" }}{%- endif %}'
    "{%- endfor %}{%- endif %}"
)
_SYSTEM = (
    '{%- if messages[0]["role"] == "system" %}'
    '{%- if messages[0]["content"] is string %}{%- set system_message = messages[0]["content"] %}'
    '{%- else %}{%- set system_message = messages[0]["content"] | map(attribute="text") | join %}'
    "{%- endif %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
)
_ASSISTANT = (
    '{%- elif message["role"] == "assistant" %}'
    + _CONTENT.replace("[IMG]", "")
    + "{{- eos_token }}"
    + '{%- else %}{{- raise_exception("roles must be system, user or assistant") }}'
    + "{%- endif %}{%- endfor %}"
)
# Pixtral (mistral-community/pixtral-12b): the system prompt opens the last user turn.
PIXTRAL_CHAT_TEMPLATE = (
    _SYSTEM
    + "{{- bos_token }}"
    + "{%- for message in loop_messages %}"
    + '{%- if message["role"] == "user" %}'
    + "{%- if loop.last and system_message is defined %}"
    + '{{- "[INST]" + system_message + "\\n\\n" }}{%- else %}{{- "[INST]" }}{%- endif %}'
    + _CONTENT
    + '{{- "[/INST]" }}'
    + _ASSISTANT
)
# Mistral 3.1 (Mistral-Small-3.1-24B-Instruct-2503): a [SYSTEM_PROMPT] block after bos.
MISTRAL3_CHAT_TEMPLATE = (
    _SYSTEM
    + "{{- bos_token }}"
    + "{%- if system_message is defined %}"
    + '{{- "[SYSTEM_PROMPT]" + system_message + "[/SYSTEM_PROMPT]" }}{%- endif %}'
    + "{%- for message in loop_messages %}"
    + '{%- if message["role"] == "user" %}'
    + '{{- "[INST]" }}'
    + _CONTENT
    + '{{- "[/INST]" }}'
    + _ASSISTANT
)
CHAT_TEMPLATES = {"llava": PIXTRAL_CHAT_TEMPLATE, "mistral3": MISTRAL3_CHAT_TEMPLATE}


def tiny_config(arch: str, layout: str = "transformers"):
    patch, merge, _, act = SETTINGS[arch]
    rope = "rope_theta" if layout == "hub" else "rope_parameters"
    text = MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        sliding_window=None,
        bos_token_id=TOKEN_IDS["<s>"],
        eos_token_id=TOKEN_IDS["</s>"],
        **{rope: {"rope_type": "default", "rope_theta": 1e6} if rope != "rope_theta" else 1e6},
    )
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=patch,
        image_size=SETTINGS[arch][2],
        hidden_act=act,
        **{rope: {"rope_type": "axial", "rope_theta": 10000.0} if rope != "rope_theta" else 1e4},
    )
    if arch == "llava":
        return LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=IMG,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu",
            image_seq_length=1,
            tie_word_embeddings=False,
        )
    return Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=IMG,
        spatial_merge_size=merge,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
    )


def build_processor(arch: str) -> PixtralProcessor:
    patch, merge, longest_edge, _ = SETTINGS[arch]
    tokenizer = build_small_tokenizer(
        VOCAB_SIZE,
        SPECIAL_TOKENS,
        CHAT_TEMPLATES[arch],
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    image_processor = PixtralImageProcessor(
        size={"longest_edge": longest_edge}, patch_size={"height": patch, "width": patch}
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        spatial_merge_size=merge,
        chat_template=CHAT_TEMPLATES[arch],
    )


def build_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = HF_CLASSES[arch](tiny_config(arch)).eval()
    randomize_zero_params(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms start at ones: perturb them so a missing one shows
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    return model


def _hub_name(name: str) -> str:
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    raise AssertionError(name)


def _save_hub(model, arch: str, folder: Path, seed: int) -> None:
    tensors = {_hub_name(n): p.detach().contiguous() for n, p in model.named_parameters()}
    if arch == "mistral3":  # tied in the model; Mistral-Small-3.1 ships an lm_head of its own
        generator = torch.Generator().manual_seed(seed + 2)
        head = tensors["language_model.model.embed_tokens.weight"]
        tensors["language_model.lm_head.weight"] = (
            torch.randn(head.shape, generator=generator) * 0.05
        )
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in shard}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = tiny_config(arch, layout="hub").to_dict()
    config["architectures"] = [ARCHITECTURES[arch]]
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    patch, merge, longest_edge, _ = SETTINGS[arch]
    preprocessor = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "PixtralImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": {"height": patch, "width": patch},
        "processor_class": "PixtralProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": longest_edge},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    processor = {
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
        "image_token": "[IMG]",
        "patch_size": patch,
        "processor_class": "PixtralProcessor",
    }
    if arch == "mistral3":
        processor["spatial_merge_size"] = merge
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    template = {"chat_template": CHAT_TEMPLATES[arch]}
    (folder / "chat_template.json").write_text(json.dumps(template, indent=2))
    build_processor(arch).tokenizer.save_pretrained(folder)


def build_pixtral_checkpoint(folder, arch: str, layout: str = "transformers", seed: int = 0) -> str:
    """A tiny random checkpoint of `arch` ("llava" or "mistral3") in `layout`; returns the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(arch, seed)
    if layout == "transformers":
        model.save_pretrained(folder, save_original_format=False)
        build_processor(arch).save_pretrained(folder)
    else:
        _save_hub(model, arch, folder, seed)
    return str(folder)
