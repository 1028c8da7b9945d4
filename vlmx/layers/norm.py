"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Matches HF `Qwen2RMSNorm` / `LlamaRMSNorm`: normalise in float32, scale in the input dtype.

    x: [..., hidden] -> [..., hidden]
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(kind: str, hidden_size: int, eps: float = 1e-6) -> nn.Module:
    """`"layer_norm"` (torch LayerNorm, with bias) or `"rms_norm"` (RMSNorm, no bias)."""
    if kind == "layer_norm":
        return nn.LayerNorm(hidden_size, eps=eps)
    if kind == "rms_norm":
        return RMSNorm(hidden_size, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; use 'layer_norm' or 'rms_norm'")
