"""The Aria preset: rhymes-ai/Aria's published config (25.3B parameters, 3.9B active per token)
as a checkpoint folder without weights, for `vlmx bench --model aria`.

The folder holds what transformers' `AriaForConditionalGeneration` and `AriaProcessor` read:
config.json, processor_config.json (AriaImageProcessor's defaults, size_conversion {490: 128,
980: 256}) and a tokenizer. The tokenizer is byte-level without merges (one token per byte; the
published vocabulary is not bundled) inside Aria's 100352 ids, with Aria's special tokens where
the model expects them (`<|img|>` = image_token_index 9) and an Aria-style chat template; text
costs a few times more tokens than with the real vocabulary, images the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AriaConfig, PretrainedConfig

VOCAB_SIZE = 100352
IMAGE_TOKEN_ID = 9
# special token -> id (the image token where the published config puts it)
SPECIAL_TOKENS = {
    "<|endoftext|>": 2,
    "<|img|>": IMAGE_TOKEN_ID,
    "<|im_start|>": 10,
    "<|im_end|>": 11,
    "<fim_prefix>": 12,
    "<fim_suffix>": 13,
}
_BYTE_OFFSET = 256  # byte b is token 256 + b
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<fim_prefix><|img|><fim_suffix>\n{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def aria_config() -> PretrainedConfig:
    """rhymes-ai/Aria's config.json (transformers' layout, model_type aria)."""
    text = dict(
        model_type="aria_text",
        vocab_size=VOCAB_SIZE,
        hidden_size=2560,
        intermediate_size=1664,
        num_hidden_layers=28,
        num_attention_heads=20,
        num_key_value_heads=20,
        max_position_embeddings=65536,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
        moe_num_experts=64,
        moe_topk=6,
        moe_num_shared_experts=2,
        bos_token_id=1,
        eos_token_id=SPECIAL_TOKENS["<|im_end|>"],
        pad_token_id=SPECIAL_TOKENS["<|endoftext|>"],
    )
    vision = dict(
        model_type="idefics3_vision",
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=980,
        patch_size=14,
        layer_norm_eps=1e-6,
    )
    return AriaConfig(
        text_config=text,
        vision_config=vision,
        projector_patch_to_query_dict={1225: 128, 4900: 256},
        image_token_index=IMAGE_TOKEN_ID,
        tie_word_embeddings=False,
        architectures=["AriaForConditionalGeneration"],
    )


def _tokenizer():
    """Byte-level, no merges: byte symbols at 256.., Aria's special tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols
    vocab = {c: _BYTE_OFFSET + i for i, c in enumerate(alphabet)} | SPECIAL_TOKENS
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )  # already in the vocabulary: they keep their ids
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_aria_metadata(config: PretrainedConfig, family: str, path: Path) -> None:
    """config.json, processor_config.json and the tokenizer files of the preset."""
    assert family == "aria", family
    from transformers import AriaImageProcessor, AriaProcessor

    config.save_pretrained(path)
    tokenizer = _tokenizer()
    tok_dir = path / "tokenizer-src"
    tokenizer.save_pretrained(tok_dir)
    tok_config_path = tok_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["extra_special_tokens"] = {"image_token": "<|img|>"}
    tok_config_path.write_text(json.dumps(tok_config))
    from transformers import AutoTokenizer

    processor = AriaProcessor(
        image_processor=AriaImageProcessor(),
        tokenizer=AutoTokenizer.from_pretrained(tok_dir),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
