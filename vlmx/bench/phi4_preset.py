"""The `phi-4-multimodal` preset: microsoft/Phi-4-multimodal-instruct's published config.json
(model_type phi4mm, its LongRoPE factors), written with a byte-level tokenizer that holds
Phi-4's vocabulary size and special tokens at their published ids, and no weights.

```
id 0..255          the 256 bytes (GPT-2's byte alphabet)
id 256..199998     unused placeholders (the real vocabulary's merges are not needed here)
id 199999..200063  <|endoftext|>, <|endoftextK|> at 200000 + K (the image's: <|endoftext10|>),
                   <|assistant|> 200019, <|end|> 200020, <|user|> 200021, <|system|> 200022, ...
```
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlmx.demo.tokenizer import _bytes_to_unicode

_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817,
    2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023,
    4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372,
    10.4687158, 11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807,
    22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66,
    32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]  # fmt: skip
VOCAB_SIZE = 200064
FIRST_SPECIAL_ID = 199999
# published special tokens by id (the rest of 199999..200063 are reserved names)
_NAMED = {
    199999: "<|endoftext|>",
    200018: "<|endofprompt|>",
    200019: "<|assistant|>",
    200020: "<|end|>",
    200021: "<|user|>",
    200022: "<|system|>",
    200023: "<|tool|>",
}
_SPEECH_LORA_LAYERS = "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))"
_VISION_LORA_LAYERS = "layers.*((self_attn\\.(qkv_proj|o_proj))|(mlp\\.(gate_up|down)_proj))"

PUBLISHED_CONFIG = {
    "architectures": ["Phi4MMForCausalLM"],
    "model_type": "phi4mm",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 199999,
    "embd_layer": {
        "audio_embd_layer": {"compression_rate": 8, "downsample_rate": 1, "embedding_cls": "audio"},
        "embedding_cls": "image_audio",
        "image_embd_layer": {
            "crop_size": 448,
            "embedding_cls": "tune_image",
            "enable_gradient_checkpointing": True,
            "hd_transform_order": "sub_glb",
            "image_token_compression_cls": "avg_pool_2d",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
    },
    "embd_pdrop": 0.0,
    "eos_token_id": 199999,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "img_processor": None,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "num_attention_heads": 24,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 199999,
    "partial_rotary_factor": 0.75,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": _LONG_FACTOR, "short_factor": [1.0] * 48, "type": "longrope"},
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "speech_lora": {"dp": 0.01, "lora_alpha": 640, "r": 320, "layer": _SPEECH_LORA_LAYERS},
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vision_lora": {"dp": 0.0, "lora_alpha": 512, "r": 256, "layer": _VISION_LORA_LAYERS},
    "vocab_size": VOCAB_SIZE,
}  # fmt: skip

# vLLM's phi4_mm prompt form: <|user|><|image_1|>...{question}<|end|><|assistant|>
CHAT_TEMPLATE = (
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


def build_phi4_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer of Phi-4's size with its special tokens at their ids."""
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = []
    for token_id in range(FIRST_SPECIAL_ID, VOCAB_SIZE):
        n = token_id - 200000  # <|endoftext10|> is 200010
        specials.append(
            _NAMED.get(token_id, f"<|endoftext{n}|>" if n < 18 else f"<|reserved_{n}|>")
        )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tokenizer.token_to_id("<|endoftext10|>") == 200010
    assert tokenizer.token_to_id("<|user|>") == 200021
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_phi4_preset(path: Path) -> None:
    """config.json, generation_config.json, preprocessor_config.json and the tokenizer."""
    (path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG, indent=2))
    generation = {"bos_token_id": 199999, "eos_token_id": [200020, 199999], "pad_token_id": 199999}
    (path / "generation_config.json").write_text(json.dumps(generation))
    preprocessor = {
        "image_processor_type": "Phi4MultimodalImageProcessor",
        "dynamic_hd": 36,
        "size": {"height": 448, "width": 448},
        "patch_size": 14,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    build_phi4_tokenizer().save_pretrained(path)
