"""A PEFT LoRA adapter folder: `adapter_config.json` and `adapter_model.safetensors` (or `.bin`).

PEFT saves one pair of tensors per adapted module, named after the module in the base model:

```
base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]
```
and computes `y = base(x) + scale * (x @ A^T) @ B^T` with `scale = lora_alpha / r` (rsLoRA:
`lora_alpha / sqrt(r)`), `r` and `lora_alpha` per module from `rank_pattern` / `alpha_pattern`
where a pattern matches (peft `LoraLayer.update_layer`, `get_pattern_key`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

_PREFIX = "base_model.model."
_CONFIG = "adapter_config.json"
_SAFETENSORS = "adapter_model.safetensors"
_BIN = "adapter_model.bin"


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of peft's `LoraConfig` that shape inference."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, scale) of one module (its name in the base model), as peft computes them."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def _pattern_key(patterns: dict, module: str) -> str:
    """The first pattern that matches the end of `module` at a dot (peft's `get_pattern_key`)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _weights_file(path: str) -> str:
    for name in (_SAFETENSORS, _BIN):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ValueError(
        f"LoRA path {path!r} holds {_CONFIG} but no {_SAFETENSORS} or {_BIN}; "
        "is it a PEFT adapter saved with save_pretrained?"
    )


def read_adapter_config(path: str) -> AdapterConfig:
    """The adapter's config; ValueError if `path` is not a PEFT LoRA folder vlmx can apply."""
    config_path = os.path.join(path, _CONFIG)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"LoRA path {path!r} is not a PEFT adapter folder (no {_CONFIG}); give the folder "
            "that save_pretrained wrote"
        )
    with open(config_path) as f:
        raw = json.load(f)
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"adapter {path!r} is a {peft_type} adapter; vlmx applies LORA only")
    unsupported = {
        "use_dora": bool(raw.get("use_dora")),
        "modules_to_save": bool(raw.get("modules_to_save")),
        "bias": raw.get("bias", "none") != "none",
        "lora_bias": bool(raw.get("lora_bias")),
        "target_parameters": bool(raw.get("target_parameters")),
        "trainable_token_indices": bool(raw.get("trainable_token_indices")),
    }
    for key, present in unsupported.items():
        if present:
            raise ValueError(
                f"adapter {path!r} sets {key}={raw.get(key)!r}, which vlmx cannot apply "
                "(LoRA A/B pairs only)"
            )
    return AdapterConfig(
        r=int(raw["r"]),
        lora_alpha=float(raw.get("lora_alpha", raw["r"])),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
    )


def split_key(key: str) -> tuple[str, str]:
    """`base_model.model.<module>.lora_A.weight` -> (module, "A"); ValueError otherwise."""
    name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
    m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
    if m is None:
        raise ValueError(
            f"adapter tensor {key!r} is no LoRA A/B weight; vlmx cannot apply it (embedding "
            "LoRA, biases and saved modules are not supported)"
        )
    return m.group(1), m.group(2)


def adapter_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, without reading the tensors where the format allows it."""
    weights = _weights_file(path)
    if weights.endswith(".safetensors"):
        with safe_open(weights, framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    return {k: tuple(t.shape) for k, t in load_adapter_tensors(path).items()}


def load_adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter, on the CPU."""
    weights = _weights_file(path)
    if weights.endswith(".safetensors"):
        with safe_open(weights, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return torch.load(weights, map_location="cpu", weights_only=True)
