"""Activations by their Hugging Face config names, and the fused `act(gate) * up` form.

`silu_and_mul` runs as one Triton kernel (`vlmx.ops.fused`) where it can (CUDA, Triton), else as
`silu_and_mul_torch`, the reference the kernel reproduces.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from vlmx.ops import fused


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
    if fused.can_fuse_silu_and_mul(x):
        return fused.silu_and_mul(x)
    return silu_and_mul_torch(x)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """Reference for `silu_and_mul`: silu rounded to x.dtype, then the product (HF's MLP)."""
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
