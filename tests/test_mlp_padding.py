"""GatedMLP pads an unaligned intermediate size with zero features; results are unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmx.layers.decoder import load_weights_into
from vlmx.layers.mlp import GatedMLP, padded_width


def test_padded_width_only_pads_unaligned_sizes():
    assert padded_width(3420) == 3456  # Qwen2.5-VL's vision MLP
    assert padded_width(11008) == 11008
    assert padded_width(64) == 64
    assert padded_width(36) == 64


def test_padded_gated_mlp_matches_the_unpadded_computation():
    torch.manual_seed(0)
    hidden, inter = 16, 36  # 36 % 8 != 0 -> padded to 64
    weights = {
        "gate_proj.weight": torch.randn(inter, hidden),
        "gate_proj.bias": torch.randn(inter),
        "up_proj.weight": torch.randn(inter, hidden),
        "up_proj.bias": torch.randn(inter),
        "down_proj.weight": torch.randn(hidden, inter),
        "down_proj.bias": torch.randn(hidden),
    }
    mlp = GatedMLP(hidden, inter, "silu", bias=True)
    assert mlp.gate_up_proj.weight.shape == (128, hidden)
    assert mlp.down_proj.weight.shape == (hidden, 64)
    with torch.no_grad():  # garbage in the padding must be cleared by the load
        mlp.gate_up_proj.weight.fill_(7.0)
        mlp.down_proj.weight.fill_(7.0)
    # wrapped so that names carry a prefix (`0.gate_proj.weight`), as inside a model
    load_weights_into(torch.nn.Sequential(mlp), weights.items(), lambda name: f"0.{name}")
    x = torch.randn(5, hidden)
    w = weights
    gate = F.linear(x, w["gate_proj.weight"], w["gate_proj.bias"])
    up = F.linear(x, w["up_proj.weight"], w["up_proj.bias"])
    expected = F.linear(F.silu(gate) * up, w["down_proj.weight"], w["down_proj.bias"])
    torch.testing.assert_close(mlp(x), expected)


def test_padded_layers_reject_misshapen_weights():
    mlp = GatedMLP(16, 36, "silu", bias=False)
    with pytest.raises(ValueError, match="expected"):
        mlp.down_proj.load_weight("weight", torch.zeros(16, 64), None)
    with pytest.raises(ValueError, match="expected"):
        mlp.gate_up_proj.load_weight("weight", torch.zeros(64, 16), 0)
