"""OpenAI-style chat messages -> HF chat-template input + the images they carry -> prompt text.

```
[{"role": "user", "content": [{"type": "text", "text": "compare"},
                              {"type": "image_url", "image_url": {"url": "a.png"}},
                              {"type": "image_pil", "image_pil": <PIL>}]}]
  -> parse_chat_messages -> messages: [{"role": "user", "content": [{"type": "text", ...},
                                                                   {"type": "image"},
                                                                   {"type": "image"}]}]
                            sources:  ["a.png", <PIL>]            (same order as the parts)
  -> render_chat         -> "<|im_start|>user\ncompare<|vision_start|><|image_pad|>..."
```
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmx.multimodal.media import describe_source

SUPPORTED_PART_TYPES = ("text", "image_url", "image_pil", "image")
_SUPPORTED = ", ".join(repr(t) for t in SUPPORTED_PART_TYPES)
_KNOWN_UNSUPPORTED = {
    "video_url": "video input",
    "video": "video input",
    "input_audio": "audio input",
    "audio_url": "audio input",
    "audio": "audio input",
    "image_embeds": "precomputed image embeddings",
}
# Arguments of `apply_chat_template` that vlmx sets itself; chat_template_kwargs may not set them.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "chat_template",
        "tokenize",
        "return_dict",
        "return_tensors",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
        "return_assistant_tokens_mask",
        "add_generation_prompt",
        "continue_final_message",
    }
)


def _image_source(part: Mapping, where: str) -> Any:
    """The image a part refers to: a URL / path string, or an in-memory image."""
    part_type = part["type"]
    if part_type == "image_url":
        value = part.get("image_url")
        if isinstance(value, Mapping):
            value = value.get("url")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{where}: 'image_url' part needs {{'image_url': {{'url': <http(s), data or file "
                f"URL, or path>}}}} (or a bare string), got {describe_source(value)}; for PIL "
                "images use {'type': 'image_pil', 'image_pil': image}"
            )
        return value
    if part_type == "image_pil":
        value = part.get("image_pil")
        if not isinstance(value, Image.Image):
            raise ValueError(
                f"{where}: 'image_pil' part needs a PIL.Image.Image under 'image_pil', got "
                f"{describe_source(value)}"
            )
        return value
    # "image", as Hugging Face chat templates write it: the image under "image", "url" or "path".
    for key in ("image", "url", "path"):
        value = part.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, (Image.Image, torch.Tensor, np.ndarray, bytes)):
            return value
        raise ValueError(
            f"{where}: 'image' part has {key}={describe_source(value)}; give a URL, path, PIL "
            "image, encoded image bytes, tensor [3, H, W] or array [H, W, 3]"
        )
    raise ValueError(
        f"{where}: 'image' part has no image; put a URL, path or PIL image under 'image'"
    )


def _parse_part(part: Any, where: str) -> tuple[dict, Any | None]:
    """One content part -> (part for the template, image source or None)."""
    if not isinstance(part, Mapping):
        raise ValueError(
            f"{where}: a content part must be a dict with a 'type', got {describe_source(part)}"
        )
    part_type = part.get("type")
    if part_type == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(
                f"{where}: 'text' part needs a string under 'text', got {describe_source(text)}"
            )
        return {"type": "text", "text": text}, None
    if part_type in SUPPORTED_PART_TYPES:
        return {"type": "image"}, _image_source(part, where)
    if part_type is None:
        raise ValueError(f"{where}: content part has no 'type'; vlmx supports types {_SUPPORTED}")
    what = _KNOWN_UNSUPPORTED.get(part_type, "this part type")
    raise ValueError(
        f"{where}: part type {part_type!r} is not supported ({what}); vlmx supports types "
        f"{_SUPPORTED}"
    )


def split_conversations(messages: Any) -> list[list]:
    """`LLM.chat`'s first argument as a list of conversations, as vLLM's `chat` takes it: one
    message (a dict), one conversation (a list of message dicts) or a list of conversations.

    Raises ValueError, saying what it got, for anything else: an empty list, a list that mixes
    messages and conversations, a list of something other than dicts or lists. The messages
    themselves are checked later, one conversation at a time (`parse_chat_messages`).
    """
    accepted = (
        "llm.chat takes one message (a dict with 'role' and 'content'), one conversation (a "
        "list of such dicts) or a list of conversations (a list of lists)"
    )
    if isinstance(messages, Mapping):
        return [[messages]]
    if not isinstance(messages, list | tuple):
        raise ValueError(f"{accepted}; got {_what(messages)}")
    if not messages:
        raise ValueError(f"{accepted}; got an empty {type(messages).__name__}")
    is_message = [isinstance(m, Mapping) for m in messages]
    is_conversation = [isinstance(m, list | tuple) for m in messages]
    if all(is_message):
        return [list(messages)]
    if all(is_conversation):
        return [list(c) for c in messages]
    if any(is_message) and any(is_conversation):
        idx_message, idx_conversation = is_message.index(True), is_conversation.index(True)
        raise ValueError(
            f"{accepted}; got a list that mixes messages (dict at index {idx_message}) and "
            f"conversations (list at index {idx_conversation})"
        )
    idx = next(i for i, (m, c) in enumerate(zip(is_message, is_conversation)) if not (m or c))
    raise ValueError(
        f"{accepted}; got a list whose item {idx} is {_what(messages[idx])}, neither a "
        "message dict nor a conversation list"
    )


def _what(value: Any) -> str:
    if isinstance(value, str):
        return f"a str ({describe_source(value)})"
    return describe_source(value)


def parse_chat_messages(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """Split OpenAI-style messages into chat-template input and the images, in order.

    Content may be a string (kept as is), None, or a list of parts: `text`, `image_url` (a dict
    with `url`, or a bare string), `image_pil` (a PIL image) and `image` (HF style: a URL, path or
    PIL image under `image`). Image parts become `{"type": "image"}`, which HF templates turn into
    the family's image placeholder. Keys other than `content` (name, tool_calls, ...) are kept.
    The images are returned unloaded: URL / path strings or in-memory images.
    """
    if isinstance(messages, Mapping) or not isinstance(messages, (list, tuple)):
        raise ValueError(
            f"messages must be a list of dicts with 'role' and 'content', got "
            f"{type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty; give at least one message")
    template_messages: list[dict] = []
    sources: list[Any] = []
    for msg_idx, message in enumerate(messages):
        where = f"messages[{msg_idx}]"
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where} has no 'role' (e.g. 'system', 'user', 'assistant')")
        content = message.get("content")
        out = dict(message)
        if isinstance(content, list | tuple):
            parts = []
            for part_idx, part in enumerate(content):
                template_part, source = _parse_part(part, f"{where}.content[{part_idx}]")
                parts.append(template_part)
                if source is not None:
                    sources.append(source)
            out["content"] = parts
        elif content is not None and not isinstance(content, str):
            raise ValueError(
                f"{where} ({role}) has content of type {type(content).__name__}; content must be "
                "a string or a list of parts ({'type': 'text', 'text': ...}, "
                "{'type': 'image_url', 'image_url': {'url': ...}}, ...)"
            )
        template_messages.append(out)
    return template_messages, sources


# ---------------------------------------------------------------------------------------------
# Chat templates


def _default_template(value: Any, source: str) -> str | None:
    """A template from a str, a {name: template} dict or a [{name, template}] list ('default')."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
    if isinstance(value, Mapping):
        if "default" in value and isinstance(value["default"], str):
            return value["default"]
        raise ValueError(
            f"{source} holds several chat templates {sorted(map(str, value))} and no 'default'; "
            "pass the one to use with chat_template="
        )
    raise ValueError(f"{source} holds a chat template of type {type(value).__name__}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"chat template file {str(path)!r} could not be read: {e}") from None


def _template_from_json(path: Path) -> str | None:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{str(path)!r} must hold a JSON object with a 'chat_template' key")
    return _default_template(data.get("chat_template"), repr(str(path)))


def load_chat_template(model_path: str, tokenizer: Any) -> str | None:
    """The checkpoint's own template: chat_template.jinja, chat_template.json, the tokenizer's."""
    folder = Path(model_path)
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        return _read_text(jinja_path)
    json_path = folder / "chat_template.json"
    if json_path.is_file():
        template = _template_from_json(json_path)
        if template:
            return template
    template = getattr(tokenizer, "chat_template", None)
    return _default_template(template, "the tokenizer") or None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a one-line template longer than a file name may be
        return False


def resolve_chat_template(chat_template: str | None, model_path: str, tokenizer: Any) -> str:
    """The template to render with: `chat_template` (text or a file path), else the model's."""
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template:
            raise ValueError(
                f"chat_template must be template text or a path to a file, got "
                f"{describe_source(chat_template)}"
            )
        maybe_path = Path(chat_template).expanduser()
        if "\n" not in chat_template and "{" not in chat_template and _is_file(maybe_path):
            if maybe_path.suffix == ".json":
                template = _template_from_json(maybe_path)
                if not template:
                    raise ValueError(f"{chat_template!r} has no 'chat_template' key")
                return template
            return _read_text(maybe_path)
        if any(c in chat_template for c in "{}\n"):
            return chat_template
        raise ValueError(
            f"chat_template={chat_template!r} looks like a file path, but no such file exists; "
            "pass the template text or the path to an existing .jinja / .json file"
        )
    template = load_chat_template(model_path, tokenizer)
    if not template:
        raise ValueError(
            f"the model at {model_path!r} has no chat template (no chat_template.jinja, no "
            "chat_template.json, none in the tokenizer); pass chat_template= with the template "
            "text or a path to a .jinja file"
        )
    return template


def render_chat(
    tokenizer: Any,
    messages_for_template: list[dict],
    chat_template: str,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
) -> str:
    """Render parsed messages to prompt text with `tokenizer.apply_chat_template`."""
    if add_generation_prompt and continue_final_message:
        raise ValueError(
            "add_generation_prompt and continue_final_message cannot both be True: the first "
            "starts a new assistant message, the second continues the last one; set "
            "add_generation_prompt=False to continue the final message"
        )
    extra = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(extra))
    if reserved:
        raise ValueError(
            f"chat_template_kwargs may not set {reserved}; pass add_generation_prompt / "
            "continue_final_message as arguments, the rest is set by vlmx"
        )
    from jinja2 import TemplateError

    try:
        prompt = tokenizer.apply_chat_template(
            messages_for_template,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **extra,
        )
    except TemplateError as e:
        raise ValueError(f"the chat template failed to render these messages: {e}") from e
    assert isinstance(prompt, str), type(prompt)
    return prompt
