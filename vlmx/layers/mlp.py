"""Feed-forward blocks and the stacked linear layer that fuses projections of one input."""

from __future__ import annotations

import torch
from torch import nn

from vlmx.layers.activation import get_act_and_mul_fn, get_act_fn


class MergedLinear(nn.Linear):
    """Several linear layers that read the same input, stacked along the output dim.

    `output_sizes` lists the parts in order (q | k | v, or gate | up). A checkpoint stores each
    part under its own name; `load_weight` copies part `shard` into its rows. `padded_sizes`
    (optional, each >= its output size) gives every part extra rows that stay zero.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool,
        padded_sizes: list[int] | None = None,
    ) -> None:
        self.padded_sizes = list(padded_sizes or output_sizes)
        super().__init__(in_features, sum(self.padded_sizes), bias=bias)
        self.output_sizes = list(output_sizes)
        self.zero_padding()

    def zero_padding(self) -> None:
        """Zero the padding rows (after construction, or after a random re-initialisation)."""
        with torch.no_grad():
            offset = 0
            for size, padded in zip(self.output_sizes, self.padded_sizes):
                for param in (self.weight, self.bias):
                    if param is not None:
                        param[offset + size : offset + padded].zero_()
                offset += padded

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> None:
        param = getattr(self, param_name)
        if shard is None:
            raise ValueError(f"{param_name} of a stacked layer needs a shard index")
        offset = sum(self.padded_sizes[:shard])
        size = self.output_sizes[shard]
        expected = (size, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"part {shard} of stacked {param_name} has shape {tuple(tensor.shape)}, "
                f"expected {expected}"
            )
        with torch.no_grad():
            param[offset : offset + size].copy_(tensor)
            param[offset + size : offset + self.padded_sizes[shard]].zero_()


class PaddedInputLinear(nn.Linear):
    """A linear layer whose input has `padded_in - in_features` extra features that are always
    zero: their weight columns are zero, so the output is that of the unpadded layer."""

    def __init__(self, in_features: int, padded_in: int, out_features: int, bias: bool) -> None:
        super().__init__(padded_in, out_features, bias=bias)
        self.loaded_in = in_features
        self.zero_padding()

    def zero_padding(self) -> None:
        with torch.no_grad():
            self.weight[:, self.loaded_in :].zero_()

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> None:
        param = getattr(self, param_name)
        expected = (param.shape[0], self.loaded_in) if param_name == "weight" else param.shape
        if shard is not None or tuple(tensor.shape) != tuple(expected):
            raise ValueError(
                f"{param_name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
            )
        with torch.no_grad():
            param[..., : tensor.shape[-1]].copy_(tensor)
            if param_name == "weight":
                self.zero_padding()


def padded_width(size: int) -> int:
    """`size` rounded up to a multiple of 64 when it isn't a multiple of 8.

    NOTE: a row of bf16 activations must start on a 16-byte boundary for cuBLAS's Hopper GEMM
    kernels; Qwen2.5-VL's vision MLP (3420 features) otherwise falls back to an Ampere kernel
    that took twice as long on an H200. Zero padding leaves the results unchanged.
    """
    return size if size % 8 == 0 else -(-size // 64) * 64


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))` with gate and up fused into one `gate_up_proj`.

    Matches HF `Qwen2MLP` (bias=False) and `Qwen2_5_VLMLP` (the Qwen2.5-VL vision MLP, bias=True).
    An intermediate size that breaks GEMM alignment is padded with zero features
    (`padded_width`). x: [N, hidden] -> [N, hidden]
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool) -> None:
        super().__init__()
        padded = padded_width(intermediate_size)
        self.gate_up_proj = MergedLinear(
            hidden_size, [intermediate_size] * 2, bias=bias, padded_sizes=[padded] * 2
        )
        if padded == intermediate_size:
            self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        else:
            self.down_proj = PaddedInputLinear(intermediate_size, padded, hidden_size, bias=bias)
        self.act_and_mul = get_act_and_mul_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class MLP(nn.Module):
    """`fc2(act(fc1(x)))`, matches HF `VisionMlp` of Qwen2-VL. x: [N, dim] -> [N, dim]"""

    def __init__(self, dim: int, hidden_dim: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = get_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
