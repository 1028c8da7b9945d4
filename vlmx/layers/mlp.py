"""Feed-forward blocks and the stacked linear layer that fuses projections of one input."""

from __future__ import annotations

import torch
from torch import nn

from vlmx.layers.activation import get_act_and_mul_fn, get_act_fn


class MergedLinear(nn.Linear):
    """Several linear layers that read the same input, stacked along the output dim.

    `output_sizes` lists the parts in order (q | k | v, or gate | up). A checkpoint stores each
    part under its own name; `load_weight` copies part `shard` into its rows.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> None:
        param = getattr(self, param_name)
        if shard is None:
            raise ValueError(f"{param_name} of a stacked layer needs a shard index")
        offset = sum(self.output_sizes[:shard])
        size = self.output_sizes[shard]
        expected = (size, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"part {shard} of stacked {param_name} has shape {tuple(tensor.shape)}, "
                f"expected {expected}"
            )
        with torch.no_grad():
            param[offset : offset + size].copy_(tensor)


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))` with gate and up fused into one `gate_up_proj`.

    Matches HF `Qwen2MLP` (bias=False) and `Qwen2_5_VLMLP` (the Qwen2.5-VL vision MLP, bias=True).
    x: [N, hidden] -> [N, hidden]
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
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
