"""Incremental detokenization of one completion, and the stop strings found in its text.

Each step decodes only a short window of token ids, as vLLM's and HF's streamers do:

```
ids:   [ prompt tail (context) | output ids ............................ ]
                   ^prefix_offset      ^read_offset                      ^len(ids)
text:  committed ......................| pending (not yet shown)
       decode(ids[prefix:]) - decode(ids[prefix:read]) = text of ids[read:]
```

The pending ids are committed when their text grows and does not end in "\ufffd" (an incomplete
UTF-8 sequence of a byte-level token: the next token may complete it). Then `prefix_offset`
moves to `read_offset` and `read_offset` to the end. Decoding from `prefix_offset` rather than
`read_offset` keeps the tokenizer's view of a word start (SentencePiece drops a leading space at
the start of a decode).

Invariant (byte-level BPE tokenizers such as Qwen's): with no stop string, `output_text` equals
`tokenizer.decode(output_ids, skip_special_tokens=..., spaces_between_special_tokens=...)`.

So a completion that is not streamed and has no stop string to look for (`whole_text=True`)
skips the windows for such tokenizers: `update` only keeps the ids, and `output_text` is one
decode of them. A decode step of 256 sequences otherwise spends over a millisecond of host time
in 256 window decodes.
"""

from __future__ import annotations

from typing import Any

from vlmx.outputs import Logprob
from vlmx.sampling_params import SamplingParams

# Prompt tokens decoded ahead of the output so that its first token reads as a continuation.
NUM_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


def _backend_decoder(tokenizer: Any):
    """The Rust `tokenizers.Tokenizer.decode` behind a fast HF tokenizer, when calling it
    directly gives what `tokenizer.decode` gives (no clean-up pass over the text); else None.

    NOTE: `tokenizer.decode` spends most of its time in Python around the Rust call (argument
    conversion, kwargs plumbing); a decode step of 256 sequences makes 512 such calls.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        type(backend).__module__.startswith("tokenizers")
        and hasattr(backend, "decode")
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    ):
        return backend.decode
    return None


def _decodes_bytewise(tokenizer: Any) -> bool:
    """Whether the tokenizer's text of ids is the concatenation of their bytes (a byte-level
    decoder behind the Rust decode `_backend_decoder` calls), so that decoding a completion at
    once gives the text its windows would have built."""
    backend = getattr(tokenizer, "_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return (
        _backend_decoder(tokenizer) is not None
        and type(decoder).__module__.startswith("tokenizers")
        and type(decoder).__name__ == "ByteLevel"
    )


class IncrementalDetokenizer:
    """Text of one completion, grown token by token, with stop strings checked on the way."""

    def __init__(
        self,
        tokenizer: Any,
        params: SamplingParams,
        prompt_token_ids: list[int] | None,
        token_texts: dict[tuple[int, bool, bool], str] | None = None,
        whole_text: bool = False,
    ) -> None:
        """token_texts: a cache, shared by the detokenizers of one tokenizer, of each token's
        text decoded on its own (by id, skip_special_tokens, spaces_between_special_tokens):
        the window a step commits is most often one token, whose text it then looks up.

        whole_text: the text is only read once the completion ends (no streaming); with no
        stop strings and a byte-level tokenizer it is then decoded at once (module docstring).
        """
        self.tokenizer = tokenizer
        self._backend_decode = _backend_decoder(tokenizer)
        self._token_texts = token_texts
        self.detokenize = params.detokenize
        self.skip_special_tokens = params.skip_special_tokens
        self.spaces_between_special_tokens = params.spaces_between_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.stop_buffer_length = params.stop_buffer_length

        self.output_token_ids: list[int] = []
        self.stop_string: str | None = None  # the stop string that ended the text, if any
        # whole-text mode: the ids whose text counts (a stop-terminating last id may not)
        self._text_ids: list[int] | None = None
        if whole_text and self.detokenize and not self.stop and _decodes_bytewise(tokenizer):
            self._text_ids = []
            self._whole: str | None = None  # their text, once decoded
            return

        context = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:]) if prompt_token_ids else []
        # NOTE: a context that does not decode to whole characters would merge its bytes with
        # the output's; decode the output on its own then.
        if context and REPLACEMENT_CHAR in self._decode(context):
            context = []
        self._ids = context  # [context | decoded output ids]
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context) if context else ""  # decode(ids[prefix:read])
        self._text = ""  # committed text
        self._delta_offset = 0  # chars of output_text already returned by get_next_delta

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def _decode_window(self, start: int, end: int) -> str:
        """decode(ids[start:end]), from `token_texts` when that is one token."""
        if end - start != 1 or self._token_texts is None:
            return self._decode(self._ids[start:end])
        key = (self._ids[start], self.skip_special_tokens, self.spaces_between_special_tokens)
        text = self._token_texts.get(key)
        if text is None:
            text = self._token_texts[key] = self._decode(self._ids[start:end])
        return text

    @property
    def output_text(self) -> str:
        """The text so far: committed text plus the pending tail (which may end in "\\ufffd")."""
        if self._text_ids is not None:
            if self._whole is None:
                self._whole = self._decode(self._text_ids)
            return self._whole
        if self.stop_string is not None or self._read_offset == len(self._ids):
            return self._text
        return self._text + self._decode(self._ids[self._prefix_offset :])[len(self._prefix_text) :]

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append `new_token_ids`; return the stop string that now ends the text, else None.

        stop_terminated: the last id is a stop token (eos or a stop token id) that ended the
        request; as in vLLM it is kept in `output_token_ids` but its text is left out unless
        `include_stop_str_in_output`. When a stop string is found, `output_text` is cut before it
        (after it with `include_stop_str_in_output`) and no longer changes.
        """
        assert self.stop_string is None, "update() after a stop string ended the text"
        self.output_token_ids += new_token_ids
        if not self.detokenize or not new_token_ids:
            return None
        if stop_terminated and not self.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        if self._text_ids is not None:
            self._text_ids += new_token_ids
            self._whole = None
            return None

        num_chars_before = len(self._text)
        for token_id in new_token_ids:
            self._ids.append(token_id)
            text = self._decode(self._ids[self._prefix_offset :])
            if len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT_CHAR):
                self._text += text[len(self._prefix_text) :]
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                self._prefix_text = self._decode_window(self._prefix_offset, self._read_offset)

        if not self.stop or len(self.output_token_ids) <= self.min_tokens:
            return None
        found = find_stop_string(
            self._text,
            len(self._text) - num_chars_before,
            self.stop,
            self.include_stop_str_in_output,
        )
        if found is None:
            return None
        self.stop_string, truncate_to = found
        self._text = self._text[:truncate_to]
        return self.stop_string

    def get_next_delta(self, finished: bool = False) -> str:
        """Text added since the last call, for streaming.

        Until `finished` (or a stop string), holds back the pending tail and the last
        `len(longest stop string) - 1` characters, so that a stream never shows text that a
        later token completes into a stop string to be cut.
        """
        assert self._text_ids is None, "a whole-text detokenizer does not stream"
        if finished or self.stop_string is not None:
            text, end = self.output_text, len(self.output_text)
        else:
            text = self._text
            end = len(text) - self.stop_buffer_length
        if end <= self._delta_offset:
            return ""
        delta = text[self._delta_offset : end]
        self._delta_offset = end
        return delta


def find_stop_string(
    text: str, num_new_chars: int, stop: list[str], include_stop_str: bool
) -> tuple[str, int] | None:
    """The first stop string in `text` that overlaps its last `num_new_chars` characters.

    Returns (stop string, length to cut `text` to), or None. A match must end in the new text:
    one that lay wholly in older text would have been found then. Of several, the one starting
    first wins (ties: the earlier in `stop`).
    """
    if num_new_chars <= 0:
        return None
    best: tuple[int, str] | None = None
    for stop_str in stop:
        start = text.find(stop_str, max(0, len(text) - num_new_chars - len(stop_str) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, stop_str)
    if best is None:
        return None
    start, stop_str = best
    return stop_str, start + len(stop_str) if include_stop_str else start


def decode_logprob_tokens(tokenizer: Any, logprobs: dict[int, Logprob]) -> None:
    """Fill each `Logprob.decoded_token` with its token's text decoded on its own."""
    token_ids = list(logprobs)
    texts = tokenizer.batch_decode([[t] for t in token_ids])
    for token_id, text in zip(token_ids, texts):
        logprobs[token_id].decoded_token = text
