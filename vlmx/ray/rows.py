"""One Dataset row -> one vlmx request (a conversation for `LLM.chat`, or a prompt dict for
`LLM.generate`) and its sampling parameters; one output -> the row's result columns.

Rows arrive as Arrow gives them back (`Table.to_pylist()`): a struct column holds every key any
row had, with None where a row had none, and nested arrays may come as numpy arrays, so values
are made plain before vlmx reads them. No Ray here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmx.outputs import RequestOutput
from vlmx.ray.config import vlmxEngineProcessorConfig
from vlmx.sampling_params import SamplingParams

# Columns added to every row; an input column of the same name is replaced.
RESULT_COLUMNS = (
    "generated_text",
    "num_input_tokens",
    "num_generated_tokens",
    "finish_reason",
    "error",
)


@dataclass(slots=True)
class RowRequest:
    """Exactly one of `conversation` (for `LLM.chat`) and `prompt` (for `LLM.generate`)."""

    conversation: list[dict] | None
    prompt: dict[str, Any] | None
    sampling_params: SamplingParams


def row_request(
    row: Mapping[str, Any], config: vlmxEngineProcessorConfig, checkpoint_params: dict[str, Any]
) -> RowRequest:
    """The request `row` asks for; raises ValueError for a row that cannot become one.

    Sampling: the row's `sampling_params` over the config's; where neither is given, the
    checkpoint's defaults (`checkpoint_params`), as `vlmx.LLM` does."""
    params = _sampling_params(row.get("sampling_params"), config.sampling_params, checkpoint_params)
    messages = row.get(config.messages_column)
    if messages is not None:
        if not config.apply_chat_template:
            raise ValueError(
                f"row has {config.messages_column!r}, which needs apply_chat_template=True; "
                f"with apply_chat_template=False give {config.prompt_column!r} instead"
            )
        return RowRequest(_plain_messages(messages), None, params)
    prompt = row.get(config.prompt_column)
    if prompt is None:
        raise ValueError(
            f"row has neither {config.messages_column!r} nor {config.prompt_column!r}; columns: "
            f"{sorted(row)}"
        )
    if not isinstance(prompt, str):
        raise ValueError(f"{config.prompt_column!r} must be a string, got {type(prompt).__name__}")
    images = _row_images(row, config.image_columns)
    if config.apply_chat_template:
        content: list[dict] = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": prompt})
        return RowRequest([{"role": "user", "content": content}], None, params)
    request: dict[str, Any] = {"prompt": prompt}
    if images:
        request["multi_modal_data"] = {"image": images}
    return RowRequest(None, request, params)


def result_columns(output: RequestOutput | None, error: str | None) -> tuple:
    """The values of `RESULT_COLUMNS` for one row: its output's, or None and the error."""
    if error is not None or output is None:
        assert error is not None, "a row with no output must have an error"
        return None, None, None, None, error
    completion = output.outputs[0]
    return (
        completion.text,
        len(output.prompt_token_ids),
        len(completion.token_ids),
        completion.finish_reason,
        None,
    )


def _sampling_params(
    row_params: Any, config_params: dict[str, Any] | None, checkpoint_params: dict[str, Any]
) -> SamplingParams:
    if row_params is None and config_params is None:
        return SamplingParams(**checkpoint_params)
    given = {} if row_params is None else _plain(row_params)
    if not isinstance(given, dict):
        raise ValueError(
            f"sampling_params must be a dict of SamplingParams fields, got {type(given).__name__}"
        )
    # NOTE: None is what Arrow gives for a key that another row set and this one did not.
    kwargs = {**(config_params or {}), **{k: v for k, v in given.items() if v is not None}}
    try:
        params = SamplingParams(**kwargs)
    except TypeError as e:  # an unknown field
        raise ValueError(f"sampling_params: {e}") from None
    if params.n != 1:
        raise ValueError(
            f"sampling_params n={params.n}: the Ray processor returns one completion per row; "
            "repeat the row (with different seeds) for several"
        )
    return params


def _plain(value: Any) -> Any:
    """Lists for numpy object arrays, recursively through dicts and lists."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _plain_messages(messages: Any) -> list[dict]:
    """`messages` with the None keys of content parts dropped and datasets images unwrapped."""
    messages = _plain(messages)
    if not isinstance(messages, list):
        raise ValueError(
            f"messages must be a list of dicts with 'role' and 'content', got "
            f"{type(messages).__name__}"
        )
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        parts = []
        for part in content:
            if isinstance(part, dict):
                part = {k: v for k, v in part.items() if v is not None}
                if part.get("type") == "image" and isinstance(part.get("image"), dict):
                    part["image"] = _image(part["image"], "an 'image' part")
            parts.append(part)
        message["content"] = parts
    return messages


def _row_images(row: Mapping[str, Any], columns: tuple[str, ...]) -> list[Any]:
    """The images of `columns` in order; a column holds None, one image or a list of them."""
    images: list[Any] = []
    for column in columns:
        value = row.get(column)
        if value is None:
            continue
        if isinstance(value, np.ndarray) and value.dtype == object:
            value = value.tolist()
        many = isinstance(value, list | tuple)
        images.extend(_image(v, f"column {column!r}") for v in (value if many else [value]))
    return images


def _image(value: Any, where: str) -> Any:
    """An image as vlmx loads it; a datasets image `{"bytes", "path"}` -> its bytes or path."""
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path") is not None:
            return value["path"]
        raise ValueError(
            f"{where} holds a dict with keys {sorted(value)}; an image dict (as Hugging Face "
            "datasets stores images) needs 'bytes' or 'path'"
        )
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value
