"""The published Qwen-VL(-Chat) layout (model_type "qwen", `QWenLMHeadModel`), read without
running the folder's code: its config.json as a transformers `Qwen2Config`, its tokenizer from
the `qwen.tiktoken` file it ships.

config.json holds the Qwen-1 decoder's fields (`hidden_size`, `intermediate_size` = twice the
MLP width: w1 and w2 are each half of it, `num_attention_heads` (MHA), `kv_channels`,
`rotary_pct`, `rotary_emb_base`, `layer_norm_epsilon`, `seq_length`, `use_dynamic_ntk`,
`use_logn_attn`) and the vision tower's under `visual` (`width`, `layers`, `heads`,
`mlp_ratio`, `patch_size`, `image_size`, `output_dim`, `image_start_id`, n_queries 256).

Dynamic NTK and log-n attention scaling change nothing up to `seq_length` positions, so the
context is capped there (`max_position_embeddings`).

The tokenizer: the tiktoken ranks of `qwen.tiktoken` (byte-level BPE, Qwen's split regex, NFC)
and, from id 151643 up, `<|endoftext|> <|im_start|> <|im_end|>`, `<|extra_0..204|>`, then
`<ref> </ref> <box> </box> <quad> </quad> <img> </img> <imgpad>`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers import processors as tk_processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast, Qwen2Config

from vlmx.demo.tokenizer import QWEN2_SPLIT_REGEX, build_once, vlmx_cache_dir, vocab_and_merges

# the published `visual` (ViT-bigG/14 at 448 px, 256 queries onto Qwen-7B's width)
VISUAL_DEFAULTS = {
    "width": 1664,
    "layers": 48,
    "heads": 16,
    "mlp_ratio": 4.9231,
    "patch_size": 14,
    "image_size": 448,
    "output_dim": 4096,
    "n_queries": 256,
    "image_start_id": 151857,
}
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    "<img>",
    "</img>",
    "<imgpad>",
)
SPECIAL_START_ID = 151643
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "visual",
)
TIKTOKEN_FILE = "qwen.tiktoken"
TOKENIZER_CLASS = "QWenTokenizer"


def read_published_config(raw: dict) -> Qwen2Config:
    """config.json of the published layout -> `Qwen2Config`, with `visual` (the defaults
    updated by the file's) as an attribute."""
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(
            f"config.json of model_type 'qwen' lacks the published fields {missing}; is it a "
            "Qwen-VL(-Chat) checkpoint?"
        )
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    if raw.get("kv_channels", hidden // heads) * heads != hidden:
        raise ValueError(f"kv_channels={raw['kv_channels']} * {heads} heads != hidden {hidden}")
    if raw.get("rotary_pct", 1.0) != 1.0:
        raise ValueError(f"rotary_pct={raw['rotary_pct']} is not supported; vlmx rotates all")
    config = Qwen2Config(
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"] // 2,  # w1, w2: half each
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=raw.get("seq_length", 2048),
        rms_norm_eps=raw.get("layer_norm_epsilon", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": raw.get("rotary_emb_base", 1e4)},
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        architectures=raw["architectures"],
    )
    config.visual = {**VISUAL_DEFAULTS, **(raw.get("visual") or {})}
    return config


def is_published_tokenizer(folder: str) -> bool:
    """Whether `folder` holds the published QWenTokenizer files (qwen.tiktoken)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(os.path.join(folder, TIKTOKEN_FILE)) or not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("tokenizer_class") == TOKENIZER_CLASS


def read_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            if line:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != SPECIAL_START_ID:
        raise ValueError(f"{path} does not hold the {SPECIAL_START_ID} ranks of qwen.tiktoken")
    return ranks


def _write_folder(tiktoken_path: str, folder: Path) -> None:
    vocab, merges = vocab_and_merges(read_ranks(tiktoken_path))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.post_processor = tk_processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    for token in SPECIAL_TOKENS:  # one by one, so that ids follow the table
        backend.add_tokens([AddedToken(token, special=True, normalized=False)])
    assert backend.token_to_id("<imgpad>") == SPECIAL_START_ID + len(SPECIAL_TOKENS) - 1
    backend.save(str(folder / "tokenizer.json"))


def load_published_tokenizer(folder: str) -> PreTrainedTokenizerFast:
    """The folder's QWenTokenizer (qwen.tiktoken + its special tokens) as a fast tokenizer;
    the BPE form is built once per file content, under the vlmx cache."""
    path = os.path.join(folder, TIKTOKEN_FILE)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    built = build_once(
        vlmx_cache_dir() / f"qwen-vl-tokenizer-{digest}", lambda tmp: _write_folder(path, tmp)
    )
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        settings = json.load(f)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(built / "tokenizer.json"),
        eos_token="<|endoftext|>",
        pad_token=settings.get("pad_token") or "<|endoftext|>",
        model_max_length=settings.get("model_max_length", 8192),
        clean_up_tokenization_spaces=False,
        chat_template=settings.get("chat_template"),
    )
