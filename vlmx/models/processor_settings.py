"""A checkpoint's processor settings, read and checked: the config files as transformers finds
them, the flags and filters vlmx supports, `mm_processor_kwargs` validation, and special token
ids from the engine's tokenizer. Shared by the family processors (`models/processing.py` is
their pipeline).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

logger = logging.getLogger(__name__)


def read_processor_files(model_path: str, defaults_name: str | None = None) -> tuple[dict, dict]:
    """(image-processor dict, processor dict) of a checkpoint, found as transformers finds them.

    transformers 5 `save_pretrained` nests the image processor under "image_processor" in
    processor_config.json, which wins; hub checkpoints keep it in preprocessor_config.json (and
    may keep processor settings such as `image_seq_len` in processor_config.json). With neither,
    the image-processor dict is empty and, when `defaults_name` is given, a warning says that
    class's defaults apply.
    """
    processor: dict = {}
    nested = os.path.join(model_path, "processor_config.json")
    if os.path.isfile(nested):
        with open(nested) as f:
            processor = json.load(f)
        if "image_processor" in processor:
            return processor["image_processor"], processor
    legacy = os.path.join(model_path, "preprocessor_config.json")
    if os.path.isfile(legacy):
        with open(legacy) as f:
            return json.load(f), processor
    if defaults_name is not None:
        logger.warning(
            "%s has no processor_config.json or preprocessor_config.json; using %s's defaults",
            model_path,
            defaults_name,
        )
    return {}, processor


# PIL's resampling ids, as image-processor configs store them
LANCZOS, BILINEAR, BICUBIC = 1, 2, 3


def check_processor_flags(
    raw: dict,
    keys: tuple[str, ...] = ("do_resize", "do_rescale", "do_normalize"),
    resample: tuple[int, ...] = (),
) -> None:
    """Raise if the image-processor config turns off a step that vlmx always runs, or names a
    resampling filter (`resample`, a PIL id) other than those given (unset: the default)."""
    for key in keys:
        if raw.get(key) is False:
            raise ValueError(f"image processor config sets {key}=false; vlmx supports only true")
    value = raw.get("resample")
    if resample and value is not None and value not in resample:
        raise ValueError(
            f"image processor config has resample={value}; vlmx supports "
            f"{' and '.join(str(r) for r in resample)}"
        )


def first_set(*values):
    """The first value that is not None (config files store null for unset fields)."""
    return next((v for v in values if v is not None), None)


def positive_int(value, name: str) -> int:
    """`value` if it is a positive int (no bool), else a ValueError naming the kwarg."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"mm_processor_kwargs {name}={value!r} must be a positive int")
    return value


def longest_edge_of(value, name: str) -> int:
    """n of a `{"longest_edge": n}` dict (HF's form of a size that bounds the longest edge)."""
    if not isinstance(value, dict) or set(value) != {"longest_edge"}:
        raise ValueError(
            f"mm_processor_kwargs {name}={value!r} is not supported; pass "
            f"{name}={{'longest_edge': n}}"
        )
    return positive_int(value["longest_edge"], f"{name}['longest_edge']")


def reject_unknown_kwargs(
    kwargs: dict, supported: Iterable[str], family: str, supported_text: str | None = None
) -> None:
    """Raise if `mm_processor_kwargs` names a key this family does not take; the message lists
    `supported_text`, else the supported names."""
    supported = tuple(supported)
    unknown = sorted(set(kwargs) - set(supported))
    if unknown:
        raise ValueError(
            f"unknown mm_processor_kwargs {unknown} for {family}; supported: "
            f"{supported_text or ', '.join(supported)}"
        )


def special_token_id(tokenizer, token: str) -> int | None:
    """The id of `token` in the tokenizer's vocabulary, or None when it has none."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def require_token_id(tokenizer, token: str, family: str) -> int:
    """`special_token_id`, or a ValueError naming the missing token."""
    token_id = special_token_id(tokenizer, token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token, which {family} checkpoints have")
    return token_id
