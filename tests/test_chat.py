"""Chat messages -> template input + images; `LLM.chat`'s input forms; template lookup;
rendering; a loader's concurrent loading."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlmx.multimodal.chat import (
    load_chat_template,
    parse_chat_messages,
    render_chat,
    resolve_chat_template,
    split_conversations,
)
from vlmx.multimodal.loader import MediaLoader

# A Qwen2-VL-like template: image parts become <|vision_start|><|image_pad|><|vision_end|>.
QWEN_LIKE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {tok: idx for idx, tok in enumerate(["[UNK]", *SPECIAL, "user", "assistant", "hi"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>"
    )


def _pil(color=(255, 0, 0), size=(4, 3)) -> Image.Image:
    return Image.new("RGB", size, color)


# ---------------------------------------------------------------------------------------------
# parse_chat_messages


def test_parse_every_part_type_in_order():
    pil_a, pil_b = _pil(), _pil((0, 255, 0))
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "compare"},
                {"type": "image_url", "image_url": {"url": "http://x/a.png", "detail": "high"}},
                {"type": "image_url", "image_url": "b.png"},
                {"type": "text", "text": "and"},
                {"type": "image_pil", "image_pil": pil_a},
                {"type": "image", "image": "data:image/png;base64,AAAA"},
                {"type": "image", "image": pil_b},
                {"type": "image", "url": "c.png"},
            ],
        },
        {"role": "assistant", "content": "ok", "name": "bot"},
    ]
    template_messages, sources = parse_chat_messages(messages)
    assert sources == [
        "http://x/a.png",
        "b.png",
        pil_a,
        "data:image/png;base64,AAAA",
        pil_b,
        "c.png",
    ]
    assert template_messages[0] == {"role": "system", "content": "be brief"}
    image = {"type": "image"}
    assert template_messages[1]["content"] == [
        {"type": "text", "text": "compare"},
        image,
        image,
        {"type": "text", "text": "and"},
        image,
        image,
        image,
        image,
    ]
    assert template_messages[2] == {"role": "assistant", "content": "ok", "name": "bot"}
    assert messages[1]["content"][0] == {"type": "text", "text": "compare"}  # input untouched
    assert messages[1]["content"][1]["type"] == "image_url"


def test_parse_images_across_messages_and_none_content():
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "1.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {
            "role": "user",
            "content": [{"type": "image", "image": "2.png"}, {"type": "text", "text": "?"}],
        },
    ]
    template_messages, sources = parse_chat_messages(messages)
    assert sources == ["1.png", "2.png"]
    assert template_messages[1] == {"role": "assistant", "content": None, "tool_calls": []}
    assert template_messages[2]["content"] == [{"type": "image"}, {"type": "text", "text": "?"}]


def test_parse_tensor_and_array_in_image_part():
    tensor, array = torch.zeros(3, 2, 2, dtype=torch.uint8), np.zeros((2, 2, 3), np.uint8)
    _, sources = parse_chat_messages(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": tensor}, {"type": "image", "image": array}],
            }
        ]
    )
    assert sources[0] is tensor and sources[1] is array


@pytest.mark.parametrize(
    ("messages", "cause"),
    [
        ([], r"messages is empty"),
        ({"role": "user", "content": "hi"}, r"must be a list"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": 3}], r"messages\[0\] \(user\) has content of type int"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}}]},
            ],
            r"messages\[1\]\.content\[0\]: part type 'video_url' is not supported \(video input\); "
            r"vlmx supports types 'text', 'image_url', 'image_pil', 'image'",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "input_audio", "input_audio": {}},
                    ],
                }
            ],
            r"content\[1\]: part type 'input_audio' is not supported \(audio input\)",
        ),
        (
            [{"role": "user", "content": [{"type": "image_embeds", "image_embeds": "..."}]}],
            r"'image_embeds' is not supported \(precomputed image embeddings\)",
        ),
        ([{"role": "user", "content": [{"type": "hologram"}]}], r"'hologram' is not supported"),
        (
            [{"role": "user", "content": [{"text": "x"}]}],
            r"content\[0\]: content part has no 'type'",
        ),
        ([{"role": "user", "content": ["x"]}], r"content\[0\]: a content part must be a dict"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            r"'text' part needs a string",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            r"'image_url' part needs",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
            r"'image_url' part needs",
        ),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": _pil()}]}], r"image_pil"),
        (
            [{"role": "user", "content": [{"type": "image_pil", "image_pil": "a.png"}]}],
            r"needs a PIL.Image.Image",
        ),
        ([{"role": "user", "content": [{"type": "image"}]}], r"'image' part has no image"),
        (
            [{"role": "user", "content": [{"type": "image", "image": 7}]}],
            r"'image' part has image=int",
        ),
    ],
)
def test_parse_errors(messages, cause):
    with pytest.raises(ValueError, match=cause):
        parse_chat_messages(messages)


# ---------------------------------------------------------------------------------------------
# LLM.chat's input forms


def test_split_conversations_takes_vllm_forms():
    user = {"role": "user", "content": "hi"}
    bot = {"role": "assistant", "content": "hello"}
    assert split_conversations(user) == [[user]]  # one message
    assert split_conversations([user, bot, user]) == [[user, bot, user]]  # one conversation
    assert split_conversations((user,)) == [[user]]
    assert split_conversations([[user], [user, bot, user]]) == [[user], [user, bot, user]]
    assert split_conversations([[user], ()]) == [[user], []]  # parse_chat_messages reports it
    # the result is a fresh list: the caller's lists are not changed later
    conversation = [user]
    assert split_conversations(conversation) is not conversation


@pytest.mark.parametrize(
    ("messages", "cause"),
    [
        ([], r"got an empty list"),
        ((), r"got an empty tuple"),
        ("hello", r"got a str \('hello'\)"),
        (None, r"got NoneType"),
        (3, r"got int"),
        (
            [{"role": "user", "content": "hi"}, [{"role": "user", "content": "hi"}]],
            r"mixes messages \(dict at index 0\) and conversations \(list at index 1\)",
        ),
        (["hello", "there"], r"item 0 is a str \('hello'\), neither a message dict nor"),
        ([{"role": "user", "content": "hi"}, 7], r"item 1 is int"),
    ],
)
def test_split_conversations_rejects_other_forms(messages, cause):
    with pytest.raises(ValueError, match=cause) as excinfo:
        split_conversations(messages)
    assert "one message (a dict with 'role' and 'content')" in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# Chat templates


def test_template_from_jinja_file_first(tmp_path, tokenizer):
    (tmp_path / "chat_template.jinja").write_text("JINJA{{ messages }}")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "JSON"}))
    tokenizer.chat_template = "TOKENIZER"
    try:
        assert load_chat_template(str(tmp_path), tokenizer) == "JINJA{{ messages }}"
        (tmp_path / "chat_template.jinja").unlink()
        assert load_chat_template(str(tmp_path), tokenizer) == "JSON"
        (tmp_path / "chat_template.json").unlink()
        assert load_chat_template(str(tmp_path), tokenizer) == "TOKENIZER"
        tokenizer.chat_template = None
        assert load_chat_template(str(tmp_path), tokenizer) is None
    finally:
        tokenizer.chat_template = None


def test_template_named_variants(tmp_path):
    class Tok:
        chat_template = {"default": "D", "tool_use": "T"}

    assert load_chat_template(str(tmp_path), Tok()) == "D"
    (tmp_path / "chat_template.json").write_text(
        json.dumps({"chat_template": [{"name": "default", "template": "J"}]})
    )
    assert load_chat_template(str(tmp_path), Tok()) == "J"
    Tok.chat_template = {"a": "A", "b": "B"}
    (tmp_path / "chat_template.json").unlink()
    with pytest.raises(ValueError, match=r"several chat templates \['a', 'b'\].*chat_template="):
        load_chat_template(str(tmp_path), Tok())
    (tmp_path / "chat_template.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        load_chat_template(str(tmp_path), Tok())


def test_resolve_chat_template(tmp_path, tokenizer):
    assert resolve_chat_template("{{ messages }}", str(tmp_path), tokenizer) == "{{ messages }}"
    path = tmp_path / "mine.jinja"
    path.write_text("FILE{{ messages }}")
    assert resolve_chat_template(str(path), str(tmp_path), tokenizer) == "FILE{{ messages }}"
    json_path = tmp_path / "mine.json"
    json_path.write_text(json.dumps({"chat_template": "FROMJSON"}))
    assert resolve_chat_template(str(json_path), str(tmp_path), tokenizer) == "FROMJSON"
    with pytest.raises(ValueError, match=r"looks like a file path, but no such file"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), str(tmp_path), tokenizer)
    with pytest.raises(ValueError, match=r"has no chat template.*pass chat_template="):
        resolve_chat_template(None, str(tmp_path), tokenizer)
    (tmp_path / "chat_template.jinja").write_text("MODEL")
    assert resolve_chat_template(None, str(tmp_path), tokenizer) == "MODEL"


# ---------------------------------------------------------------------------------------------
# render_chat


def test_render_qwen_like_template(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "a.png"}},
                {"type": "text", "text": "vs"},
                {"type": "image_pil", "image_pil": _pil()},
                {"type": "text", "text": "which?"},
            ],
        },
    ]
    template_messages, sources = parse_chat_messages(messages)
    prompt = render_chat(tokenizer, template_messages, QWEN_LIKE)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert prompt == (
        "<|im_start|>system\nbe brief<|im_end|>\n"
        f"<|im_start|>user\n{vision}vs{vision}which?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt.count("<|image_pad|>") == len(sources) == 2
    no_prompt = render_chat(tokenizer, template_messages, QWEN_LIKE, add_generation_prompt=False)
    assert no_prompt.endswith("which?<|im_end|>\n")


def test_render_continue_final_message_and_kwargs(tokenizer):
    template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
        "{% if not loop.last or not continue_final_message %}</s>{% endif %}{% endfor %}"
        "{% if flavour %}|{{ flavour }}{% endif %}"
    )
    messages, _ = parse_chat_messages(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    )
    prompt = render_chat(
        tokenizer,
        messages,
        template,
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert prompt == "[user]hi</s>[assistant]The answer is"
    flavoured = render_chat(
        tokenizer, messages, template, False, False, chat_template_kwargs={"flavour": "salty"}
    )
    assert flavoured.endswith("|salty")


def test_render_errors(tokenizer):
    messages, _ = parse_chat_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"cannot both be True"):
        render_chat(tokenizer, messages, QWEN_LIKE, True, True)
    with pytest.raises(ValueError, match=r"chat_template_kwargs may not set \['tokenize'\]"):
        render_chat(tokenizer, messages, QWEN_LIKE, chat_template_kwargs={"tokenize": True})
    raising = "{{ raise_exception('only user and assistant roles') }}"
    with pytest.raises(ValueError, match=r"failed to render.*only user and assistant roles"):
        render_chat(tokenizer, messages, raising)
    with pytest.raises(ValueError, match=r"failed to render"):
        render_chat(tokenizer, messages, "{% for %}")


# ---------------------------------------------------------------------------------------------
# MediaLoader.load_all


def _png_bytes(color) -> bytes:
    buffer = io.BytesIO()
    _pil(color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_all_keeps_order(tmp_path):
    colors = [(i * 20, 255 - i * 20, 7) for i in range(10)]
    sources = []
    for idx, color in enumerate(colors):
        if idx % 3 == 0:
            path = tmp_path / f"{idx}.png"
            path.write_bytes(_png_bytes(color))
            sources.append(str(path))
        elif idx % 3 == 1:
            sources.append(_pil(color))
        else:
            sources.append(torch.tensor(color, dtype=torch.uint8).reshape(3, 1, 1).expand(3, 3, 4))
    loader = MediaLoader()
    for max_workers in (1, 4):
        images = loader.load_all(sources, max_workers=max_workers)
        assert [tuple(image[:, 0, 0].tolist()) for image in images] == colors
        assert all(image.shape == (3, 3, 4) and image.dtype == torch.uint8 for image in images)
    assert loader.load_all([]) == []


def test_load_all_names_the_failing_image(tmp_path):
    loader = MediaLoader()
    sources = [_pil(), str(tmp_path / "missing.png"), _pil(), "data:image/png;base64,@@"]
    with pytest.raises(
        ValueError, match=r"image 1 \('.*missing.png'\) failed to load: .*does not exist"
    ):
        loader.load_all(sources, max_workers=4)
    with pytest.raises(ValueError, match=r"image 0 \(int\) failed to load: unsupported image type"):
        loader.load_all([3])
    with pytest.raises(ValueError, match=r"image 1 \(data URL .*\) failed to load: .*base64"):
        loader.load_all([_pil(), "data:image/png;base64,@@"])
    with pytest.raises(ValueError, match=r"max_workers must be >= 1"):
        loader.load_all([_pil()], max_workers=0)
    with pytest.raises(ValueError, match=r"max_workers must be >= 1"):
        MediaLoader(max_workers=0)
