"""Activations by their Hugging Face config names, and the fused `act(gate) * up` form."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """HF `QuickGELUActivation`."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,  # exact (erf), HF `GELUActivation`
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "quick_gelu": quick_gelu,
}


def get_act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] (gate | up) -> silu(gate) * up: [..., d]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def get_act_and_mul_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x [..., 2 * d] (gate | up) -> act(gate) * up [..., d]` for the named activation."""
    if name in ("silu", "swish"):
        return silu_and_mul
    act = get_act_fn(name)

    def act_and_mul(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return act(x[..., :d]) * x[..., d:]

    return act_and_mul
