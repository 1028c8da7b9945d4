"""Pixtral vision tower, shared by Pixtral (Llava) and Mistral 3, and their 2D RoPE.

Matches HF `PixtralVisionModel` (transformers 5.24): a Conv2d patch embedding (kernel == stride,
no bias, done here as a matmul over flattened patches), `ln_pre` RMSNorm, then
`num_hidden_layers` pre-norm layers of RMSNorm -> attention with 2D RoPE -> residual, RMSNorm ->
gated MLP -> residual. Images keep their native resolution, so each has its own patch grid;
patches of one image attend to each other only (one `varlen_attention` segment per image, as
HF's block-diagonal mask or its flash-attention `cu_seqlens` path does).

Public API:

```python
tower = PixtralVisionTower(vision_config)      # HF PixtralVisionConfig
states = tower(
    patches,          # [N, C * p * p], images one after another, each row-major over its grid,
                      # each patch flattened in (C, p_row, p_col) order (`siglip.patchify`)
    grids,            # list of (rows, cols) patch grids, one per image, sum(r * c) == N
    feature_layers,   # hidden-state indices to return (0 = after ln_pre, i = after layer i,
                      # negative counts from the end as in HF `hidden_states[...]`)
)                     # -> one [N, hidden] tensor per requested index, in the order asked
```

Parameter names equal HF's below `vision_tower.`, with q/k/v fused into `attention.qkv_proj` and
gate/up into `feed_forward.gate_up_proj` by `load_weights_into`:

```
patch_conv.weight                               Conv2d [D, C, p, p] -> Linear [D, C*p*p]
ln_pre.weight
transformer.layers.{i}.attention_norm / ffn_norm
transformer.layers.{i}.attention.{q,k,v,o}_proj
transformer.layers.{i}.feed_forward.{gate,up,down}_proj
```
"""

from __future__ import annotations

import torch
from torch import nn

from vlmx.layers.attention import VarlenSegments, varlen_attention
from vlmx.layers.mlp import GatedMLP, MergedLinear
from vlmx.layers.norm import RMSNorm
from vlmx.layers.rotary import _InvFreq, apply_rotary
from vlmx.layers.vision import PatchProjection

PIXTRAL_NORM_EPS = 1e-5  # HF hard-codes it for ln_pre, attention_norm and ffn_norm

Grid2D = tuple[int, int]  # (rows, cols) in patches


def pixtral_rope_theta(vision_config) -> float:
    """`rope_parameters["rope_theta"]` (transformers 5) or `rope_theta` (older configs)."""
    params = getattr(vision_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(vision_config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def grid_positions(grids: list[Grid2D]) -> torch.Tensor:
    """(row, col) of every patch, images one after another, row-major: [N, 2] int64 on the CPU."""
    out = []
    for rows, cols in grids:
        r = torch.arange(rows, device="cpu").view(rows, 1).expand(rows, cols)
        c = torch.arange(cols, device="cpu").view(1, cols).expand(rows, cols)
        out.append(torch.stack((r, c), dim=-1).reshape(rows * cols, 2))
    return torch.cat(out)


def grid_cu_seqlens(grids: list[Grid2D]) -> list[int]:
    """Segment boundaries, one segment per image: [0, n0, n0 + n1, ..., N]."""
    cu = [0]
    for rows, cols in grids:
        cu.append(cu[-1] + rows * cols)
    return cu


class PixtralRotaryEmbedding(nn.Module):
    """Axial 2D RoPE of HF `PixtralVisionRotaryEmbedding` (rope_type "axial").

    With `f = 1 / theta ** (arange(0, head_dim, 2) / head_dim)` ([head_dim / 2]), the rows use
    the even frequencies `f[0::2]` and the columns the odd ones `f[1::2]`:

    ```
    angle[:head_dim / 4]              = row * f[0::2]
    angle[head_dim / 4 : head_dim / 2] = col * f[1::2]
    angle[head_dim / 2 :]              = angle[: head_dim / 2]      (rotate-half layout)
    ```
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # NOTE: float32 on the CPU with HF's ops, so the table is bit-identical on any device.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        inv_freq = 1.0 / (theta**exponents)  # [head_dim / 2]
        self._row_freq = _InvFreq(inv_freq[0::2].contiguous())  # [head_dim / 4]
        self._col_freq = _InvFreq(inv_freq[1::2].contiguous())  # [head_dim / 4]

    def forward(self, pos_rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos_rc: [N, 2] (row, col) int64 -> cos, sin: [N, head_dim] float32."""
        row = pos_rc[:, 0:1].float() * self._row_freq.on(pos_rc.device)  # [N, head_dim / 4]
        col = pos_rc[:, 1:2].float() * self._col_freq.on(pos_rc.device)  # [N, head_dim / 4]
        freqs = torch.cat((row, col, row, col), dim=-1)  # [N, head_dim]
        return freqs.cos(), freqs.sin()


class PixtralAttention(nn.Module):
    """Matches HF `PixtralAttention` (no biases), q/k/v fused: [N, D] -> [N, D]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dim = dim
        self.qkv_proj = MergedLinear(dim, [dim, dim, dim], bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: VarlenSegments
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v.contiguous(), segments, scale=self.head_dim**-0.5)
        return self.o_proj(out.reshape(n, self.dim))


class PixtralLayer(nn.Module):
    """Matches HF `PixtralAttentionLayer`."""

    def __init__(self, dim: int, num_heads: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim, PIXTRAL_NORM_EPS)
        self.attention = PixtralAttention(dim, num_heads)
        self.ffn_norm = RMSNorm(dim, PIXTRAL_NORM_EPS)
        self.feed_forward = GatedMLP(dim, intermediate_size, act, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: VarlenSegments
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, segments)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nn.Module):
    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        self.layers = nn.ModuleList(
            PixtralLayer(
                vc.hidden_size, vc.num_attention_heads, vc.intermediate_size, vc.hidden_act
            )
            for _ in range(vc.num_hidden_layers)
        )


class PixtralVisionTower(nn.Module):
    """Matches HF `PixtralVisionModel`; see the module docstring for inputs and outputs."""

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        self.patch_size = vc.patch_size
        self.num_layers = vc.num_hidden_layers
        self.patch_conv = PatchProjection(
            vc.num_channels * vc.patch_size**2, vc.hidden_size, bias=False
        )
        self.ln_pre = RMSNorm(vc.hidden_size, PIXTRAL_NORM_EPS)
        self.transformer = PixtralTransformer(vc)
        self.rotary = PixtralRotaryEmbedding(
            vc.hidden_size // vc.num_attention_heads, pixtral_rope_theta(vc)
        )

    def resolve_layers(self, feature_layers: list[int]) -> list[int]:
        """Hidden-state indices as ints in [0, num_layers]; ValueError if out of range."""
        total = self.num_layers + 1
        resolved = []
        for idx in feature_layers:
            if not -total <= idx < total:
                raise ValueError(
                    f"vision_feature_layer {idx} is out of range for a vision tower of "
                    f"{self.num_layers} layers ({total} hidden states)"
                )
            resolved.append(idx % total)
        return resolved

    def forward(
        self, patches: torch.Tensor, grids: list[Grid2D], feature_layers: list[int]
    ) -> list[torch.Tensor]:
        wanted = self.resolve_layers(feature_layers)
        cu_seqlens = grid_cu_seqlens(grids)
        assert cu_seqlens[-1] == patches.shape[0], (cu_seqlens[-1], patches.shape)
        x = self.ln_pre(self.patch_conv(patches.to(self.patch_conv.weight.dtype)))  # [N, D]
        cos, sin = self.rotary(grid_positions(grids).to(x.device, non_blocking=True))
        # NOTE: HF casts the tables to the activations' dtype before rotating.
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        states = {0: x}
        last = max(wanted)
        segments = VarlenSegments(cu_seqlens)  # device tensors built once, for every layer
        for i, layer in enumerate(self.transformer.layers[:last]):
            x = layer(x, cos, sin, segments)
            states[i + 1] = x
        return [states[i] for i in wanted]
