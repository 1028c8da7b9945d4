"""The `llama-3.2-11b-vision` preset: meta-llama/Llama-3.2-11B-Vision-Instruct's published config
as a weightless folder (the engine fills random weights, `load_format="dummy"`).

The published tokenizer is not available offline; the folder gets a stand-in of the same shape:
the Qwen2 byte-level BPE cut to the 128000 ids below Llama 3's specials (its merges among them
kept), the 256 Llama 3 special tokens at 128000..128255 (`<|begin_of_text|>`, the header ids,
`<|eot_id|>`, ...) and `<|image|>` at 128256, bos added in front as Llama 3's does. Prompts
tokenize to about the lengths the real tokenizer gives.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import MllamaConfig

from vlmx.demo.tokenizer import qwen2_tokenizer_dir

NUM_REGULAR = 128000
IMAGE_TOKEN_ID = 128256
_NAMED = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}
# Llama 3.2 Vision's chat template, reduced to text and image parts (no tools, no date line).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def llama_3_2_11b_vision() -> MllamaConfig:
    """The published config.json of meta-llama/Llama-3.2-11B-Vision-Instruct."""
    text = dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=40,
        cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        pad_token_id=128004,
    )
    vision = dict(
        hidden_size=1280,
        num_hidden_layers=32,
        num_global_layers=8,
        attention_heads=16,
        intermediate_size=5120,
        image_size=560,
        patch_size=14,
        max_num_tiles=4,
        intermediate_layers_indices=[3, 7, 15, 23, 30],
        vision_output_dim=7680,
        norm_eps=1e-5,
        hidden_act="gelu",
        num_channels=3,
        supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    )
    return MllamaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE_TOKEN_ID,
        architectures=["MllamaForConditionalGeneration"],
    )


def _tokenizer_json() -> dict:
    source = json.loads((Path(qwen2_tokenizer_dir()) / "tokenizer.json").read_text())
    model = source["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < NUM_REGULAR}
    merges = []
    for merge in model["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        if a in vocab and b in vocab and a + b in vocab:
            merges.append([a, b])
    model["vocab"], model["merges"] = vocab, merges
    names = {
        i: _NAMED.get(i, f"<|reserved_special_token_{i - NUM_REGULAR}|>")
        for i in range(NUM_REGULAR, IMAGE_TOKEN_ID)
    }
    names[IMAGE_TOKEN_ID] = "<|image|>"
    source["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in names.items()
    ]  # fmt: skip
    source["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {
            "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": [
                "<|begin_of_text|>"]}
        },
    }  # fmt: skip
    return source


def write_mllama_preset(config: MllamaConfig, family: str, path: Path) -> None:
    """Every file of the published checkpoint but the weights (see the module docstring)."""
    del family
    config.save_pretrained(path)
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
                    "pad_token_id": 128004, "temperature": 0.6, "top_p": 0.9})
    )  # fmt: skip
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "MllamaImageProcessor",
                "processor_class": "MllamaProcessor",
                "do_convert_rgb": True,
                "do_normalize": True,
                "do_pad": True,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "max_image_tiles": 4,
                "resample": 2,
                "rescale_factor": 1 / 255,
                "size": {"height": 560, "width": 560},
            },
            indent=2,
        )
    )
    (path / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "pad_token": "<|finetune_right_pad_id|>",
                "model_max_length": 131072,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
