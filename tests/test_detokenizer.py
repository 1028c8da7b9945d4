import random

import pytest

from vlmx.demo.tokenizer import EOS_TOKEN_ID, load_qwen_ranks
from vlmx.engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens, find_stop_string
from vlmx.outputs import Logprob
from vlmx.sampling_params import SamplingParams

PIECES = ["Hello", " world", ", 世界", "😀🎉", " naïve café", "\n\n", " 東京タワー", "!", "Ω≈ç√"]


@pytest.fixture(scope="module")
def tok(qwen_tokenizer):
    return qwen_tokenizer  # the session's Qwen2 tokenizer (conftest)


@pytest.fixture(scope="module")
def byte_ids():
    """Token id of each single byte (every byte is a token in a byte-level BPE)."""
    ranks = load_qwen_ranks()
    return [ranks[bytes([b])] for b in range(256)]


def split_bytes(text, byte_ids):
    return [byte_ids[b] for b in text.encode()]


def random_ids(rng, tok, byte_ids, length):
    """Token ids mixing real text, characters split into byte tokens, special and random ids."""
    ids = []
    while len(ids) < length:
        kind = rng.random()
        piece = rng.choice(PIECES)
        if kind < 0.35:
            ids += tok.encode(piece, add_special_tokens=False)
        elif kind < 0.6:
            ids += split_bytes(piece, byte_ids)
        elif kind < 0.7:
            ids.append(rng.randrange(151643, len(tok)))  # added tokens, special or not
        else:
            ids.append(rng.randrange(0, len(tok)))
    return ids[:length]


def feed(detok, ids, rng=None):
    """Feed ids one at a time (or in random chunks); return the streamed deltas."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4) if rng else 1
        assert detok.update(ids[i : i + n]) is None
        deltas.append(detok.get_next_delta())
        i += n
    deltas.append(detok.get_next_delta(finished=True))
    return deltas


@pytest.mark.parametrize("shared_token_texts", [False, True])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_final_text_equals_decode_on_random_ids(
    tok, byte_ids, skip_special_tokens, shared_token_texts
):
    rng = random.Random(0)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    token_texts = {} if shared_token_texts else None  # one cache for every trial, as the engine
    for trial in range(300):
        prompt = random_ids(rng, tok, byte_ids, rng.randint(0, 12))
        output = random_ids(rng, tok, byte_ids, rng.randint(1, 40))
        detok = IncrementalDetokenizer(tok, params, prompt, token_texts)
        deltas = feed(detok, output, rng if trial % 2 else None)
        expected = tok.decode(output, skip_special_tokens=skip_special_tokens)
        assert detok.output_text == expected, (prompt, output)
        assert "".join(deltas) == expected, (prompt, output)
        assert detok.output_token_ids == output
    if token_texts is not None:
        assert token_texts  # the cache was used


@pytest.mark.parametrize("include_stop_str", [False, True])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_whole_text_equals_the_windows_text(tok, byte_ids, skip_special_tokens, include_stop_str):
    """A completion read only at its end (the engine's) keeps ids and decodes them at once: the
    same text as the windows build, on random ids (split characters, special tokens) and
    stop-terminated ends; with stop strings the windows stay (they are checked every step)."""
    rng = random.Random(2)
    params = SamplingParams(
        skip_special_tokens=skip_special_tokens, include_stop_str_in_output=include_stop_str
    )
    for trial in range(200):
        prompt = random_ids(rng, tok, byte_ids, rng.randint(0, 12))
        output = random_ids(rng, tok, byte_ids, rng.randint(1, 40))
        whole = IncrementalDetokenizer(tok, params, prompt, whole_text=True)
        windows = IncrementalDetokenizer(tok, params, prompt)
        stop_terminated = trial % 3 == 0
        for i, token_id in enumerate(output):
            last = stop_terminated and i == len(output) - 1
            assert whole.update([token_id], stop_terminated=last) is None
            windows.update([token_id], stop_terminated=last)
            if i == len(output) // 2:
                assert whole.output_text == windows.output_text  # read mid-way too
        assert whole._text_ids is not None  # decoded at once, not by windows
        assert whole.output_text == windows.output_text, (prompt, output)
        assert whole.output_token_ids == output
    with_stop = SamplingParams(stop=["x"])
    assert IncrementalDetokenizer(tok, with_stop, [], whole_text=True)._text_ids is None
    with pytest.raises(AssertionError, match="does not stream"):
        IncrementalDetokenizer(tok, params, [], whole_text=True).get_next_delta()


def test_whole_text_needs_a_byte_level_decoder():
    """A tokenizer whose decoder is not byte-level (here a SentencePiece-style Metaspace one)
    keeps the windows: its text of a completion need not be the text of its ids decoded alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"▁a": 0, "▁b": 1, "[UNK]": 2}, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), [0], whole_text=True)
    assert detok._text_ids is None
    detok.update([1, 0])
    assert detok.output_text == " b a"  # the prompt's "a" keeps the output's first space


def test_multibyte_characters_split_across_tokens(tok, byte_ids):
    text = "a中文😀b"
    ids = split_bytes(text, byte_ids)
    detok = IncrementalDetokenizer(tok, SamplingParams(), tok.encode("Say: "))
    seen = []
    for token_id in ids:
        detok.update([token_id])
        delta = detok.get_next_delta()
        assert "\ufffd" not in delta  # half characters are held back
        seen.append(delta)
    assert seen == ["a", "", "", "中", "", "", "文", "", "", "", "😀", "b"]
    assert detok.output_text == text


def test_output_text_shows_a_dangling_partial_character(tok, byte_ids):
    ids = tok.encode("ok", add_special_tokens=False) + split_bytes("中", byte_ids)[:2]
    detok = IncrementalDetokenizer(tok, SamplingParams(), [])
    feed(detok, ids)
    assert detok.output_text == tok.decode(ids) == "ok\ufffd"


def test_special_tokens(tok):
    ids = tok.encode("Hi<|im_end|>\n<|im_start|>there<tool_call>", add_special_tokens=False)
    for skip in (True, False):
        for spaces in (True, False):
            params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
            detok = IncrementalDetokenizer(tok, params, [])
            feed(detok, ids)
            assert detok.output_text == tok.decode(ids, skip_special_tokens=skip)
            # <tool_call> is an added token but not a special one: always kept.
            assert detok.output_text == ("Hi\nthere<tool_call>" if skip else tok.decode(ids))


def test_stop_string_spanning_tokens(tok):
    ids = tok.encode("Hello world, how are you", add_special_tokens=False)
    for include, expected_text in [(False, "Hel"), (True, "Hello wor")]:
        params = SamplingParams(stop=["xyz", "lo wor"], include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tok, params, [])
        results = [detok.update([ids[0]]), detok.update([ids[1]])]  # "Hello", " world"
        assert results == [None, "lo wor"]
        assert detok.output_text == expected_text
        assert detok.stop_string == "lo wor"
        assert detok.get_next_delta() == expected_text


def test_stop_string_inside_split_character(tok, byte_ids):
    ids = split_bytes("ab中文cd", byte_ids)
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["中文"]), [])
    found = [detok.update([t]) for t in ids[:8]]
    assert found == [None] * 7 + ["中文"]
    assert detok.output_text == "ab"


def test_stop_string_in_a_multi_token_update(tok):
    ids = tok.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=[" three", "one t"]), [])
    assert detok.update(ids) == "one t"  # the one that starts first wins
    assert detok.output_text == ""
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=" three"), [])
    assert detok.update(ids) == " three"
    assert detok.output_text == "one two"
    assert detok.output_token_ids == ids


def test_stream_never_shows_a_stop_string(tok):
    ids = tok.encode("ab ## cd #", add_special_tokens=False) + tok.encode(
        "## tail", add_special_tokens=False
    )
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["###"]), [])
    deltas = []
    for token_id in ids:
        stop = detok.update([token_id])
        deltas.append(detok.get_next_delta(finished=stop is not None))
        if stop:
            break
    assert stop == "###"
    assert "".join(deltas) == detok.output_text == "ab ## cd "


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode("x. y. z.", add_special_tokens=False)  # x . ␣y . ␣z .
    params = SamplingParams(stop=["."], min_tokens=2)
    detok = IncrementalDetokenizer(tok, params, [])
    found = [detok.update([t]) for t in ids[:4]]
    assert found == [None, None, None, "."]
    assert detok.output_text == "x. y"


def test_stop_terminated_token_left_out_of_text(tok):
    ids = tok.encode("Hi there", add_special_tokens=False)
    stop_id = tok.encode(".", add_special_tokens=False)[0]
    for include, suffix in [(False, ""), (True, ".")]:
        params = SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tok, params, [])
        detok.update(ids)
        detok.update([stop_id], stop_terminated=True)
        assert detok.output_text == "Hi there" + suffix
        assert detok.output_token_ids == ids + [stop_id]
    params = SamplingParams(skip_special_tokens=False)
    detok = IncrementalDetokenizer(tok, params, [])
    detok.update(ids + [EOS_TOKEN_ID], stop_terminated=True)
    assert detok.output_text == "Hi there"


def test_prompt_context_ending_mid_character(tok, byte_ids):
    prompt = tok.encode("Q:", add_special_tokens=False) + split_bytes("中", byte_ids)[:2]
    output = [byte_ids[0xAD]] + tok.encode(" ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, SamplingParams(), prompt)
    feed(detok, output)
    assert detok.output_text == tok.decode(output) == "\ufffd ok"


def test_no_detokenize(tok):
    detok = IncrementalDetokenizer(tok, SamplingParams(detokenize=False), [1, 2])
    assert detok.update([10, 20]) is None
    assert detok.output_text == "" and detok.output_token_ids == [10, 20]


def test_find_stop_string():
    assert find_stop_string("abcdef", 3, ["cd"], False) == ("cd", 2)  # overlaps the new "def"
    assert find_stop_string("abcdef", 1, ["cd"], False) is None  # ended in old text
    assert find_stop_string("abcdef", 1, ["ef"], True) == ("ef", 6)
    assert find_stop_string("abcdef", 6, ["e", "bc"], False) == ("bc", 1)
    assert find_stop_string("abc", 0, ["c"], False) is None


def test_decode_logprob_tokens(tok):
    ids = tok.encode(" hello 世界", add_special_tokens=False)
    entries = {t: Logprob(-1.0, i + 1) for i, t in enumerate(ids)}
    decode_logprob_tokens(tok, entries)
    assert [e.decoded_token for e in entries.values()] == [tok.decode([t]) for t in ids]


@pytest.mark.parametrize("spaces", [True, False])
def test_backend_decode_equals_tokenizer_decode(tok, byte_ids, spaces):
    """The detokenizer calls the Rust decoder directly; it must give `tokenizer.decode`'s text."""
    from vlmx.engine.detokenizer import _backend_decoder

    backend = _backend_decoder(tok)
    assert backend is not None  # a fast tokenizer without clean-up: the shortcut applies
    rng = random.Random(1)
    for _ in range(200):
        ids = random_ids(rng, tok, byte_ids, rng.randint(1, 30))
        for skip in (True, False):
            expected = tok.decode(
                ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces
            )
            assert backend(ids, skip_special_tokens=skip) == expected, ids
