"""Normalisation layers.

RMSNorm runs as one fused Triton kernel (`vlmx.ops.fused`) where it can (CUDA, Triton), else as
the torch code below, which is the reference the kernel reproduces.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmx.ops import fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden], weight: [hidden] -> [..., hidden] in promote(weight, x) dtype."""
    if fused.can_fuse_rms_norm(x, weight):
        return fused.rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF `Qwen2RMSNorm`: normalise in float32, round to x.dtype, then scale by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual), x + residual)`: the pre-norm block's residual add and norm.

    x, residual: [..., hidden] of one dtype; weight: [hidden].
    """
    if fused.can_fuse_add_rms_norm(x, residual, weight):
        return fused.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_torch(x, residual, weight, eps)


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `add_rms_norm`: the sum rounded to the dtype, then `rms_norm_torch`."""
    residual = x + residual
    return rms_norm_torch(residual, weight, eps), residual


class RMSNorm(nn.Module):
    """Matches HF `Qwen2RMSNorm` / `LlamaRMSNorm`: normalise in float32, scale in the input dtype.

    x: [..., hidden] -> [..., hidden]
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(self(x + residual), x + residual)` in one pass where the kernel runs."""
        return add_rms_norm(x, residual, self.weight, self.eps)


def make_norm(kind: str, hidden_size: int, eps: float = 1e-6) -> nn.Module:
    """`"layer_norm"` (torch LayerNorm, with bias) or `"rms_norm"` (RMSNorm, no bias)."""
    if kind == "layer_norm":
        return nn.LayerNorm(hidden_size, eps=eps)
    if kind == "rms_norm":
        return RMSNorm(hidden_size, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; use 'layer_norm' or 'rms_norm'")
