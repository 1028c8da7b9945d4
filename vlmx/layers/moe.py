"""A mixture-of-experts MLP: a top-k router, routed experts as stacked weights, shared experts.

Matches HF `AriaTextMoELayer` (transformers 5), and is shaped for DeepSeek-MoE-style layers too
(routed experts beside always-on shared experts):

```
x [T, H] --router (linear, no bias)--> logits [T, E] --top-k--> ids [T, k], logits [T, k]
         weights = softmax over the k selected logits       (AriaTextTopKRouter; the same as
                                                             renormalising a softmax over all E)
routed:  y_t = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = ids[t, j]
shared:  s_t = GatedMLP(x_t) with intermediate I * num_shared_experts (AriaSharedExpertsMLP)
out = y + s
```

Routed weights are stacked over experts in the layout Aria's checkpoints store them
(`experts.fc1.weight` [E, H, 2I], gate columns then up columns; `experts.fc2.weight` [E, I, H];
input features first, as `x @ w`), held here as `experts.gate_up_proj` / `experts.down_proj`
(transformers 5's names; `MOE_WEIGHT_RENAMES` maps the checkpoint names). On CUDA the routed
experts run the fused Triton MoE (`vlmx.ops.fused_moe`: tokens sorted by expert, one grouped
GEMM for gate-up with SiLU-mul fused, one for down); elsewhere the torch reference below, which
is also the kernels' correctness oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmx.layers.mlp import GatedMLP

# checkpoint name ending -> parameter name ending (Aria's published / save_pretrained layout)
MOE_WEIGHT_RENAMES: tuple[tuple[str, str], ...] = (
    (".experts.fc1.weight", ".experts.gate_up_proj"),
    (".experts.fc2.weight", ".experts.down_proj"),
)


def rename_moe_weight(name: str) -> str:
    """A checkpoint's expert tensor name -> this layer's parameter name (others unchanged)."""
    for suffix, ours in MOE_WEIGHT_RENAMES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ours
    return name


@dataclass(frozen=True, slots=True)
class MoEConfig:
    hidden_size: int
    intermediate_size: int  # per routed expert
    num_experts: int
    top_k: int
    num_shared_experts: int  # shared MLP's intermediate = intermediate_size * this (0: none)
    shared_act: str = "silu"  # routed experts are always SiLU-gated (as Aria's)

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(
                f"moe_topk={self.top_k} must be between 1 and moe_num_experts={self.num_experts}"
            )

    @classmethod
    def from_aria(cls, cfg) -> MoEConfig:
        """From an HF `AriaTextConfig`."""
        return cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_experts=cfg.moe_num_experts,
            top_k=cfg.moe_topk,
            num_shared_experts=cfg.moe_num_shared_experts,
            shared_act=getattr(cfg, "hidden_act", "silu"),
        )


def route_topk_softmax(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF `AriaTextTopKRouter`: (weights [T, k] in x.dtype, ids [T, k] int64), experts picked on
    the raw logits and weighted by the softmax of the k picked logits."""
    logits = F.linear(x, router_weight)  # [T, E]
    top_logits, top_ids = torch.topk(logits, top_k, dim=-1)  # [T, k]
    return torch.softmax(top_logits, dim=-1), top_ids


def moe_experts_torch(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [E, H, 2I]
    w_down: torch.Tensor,  # [E, I, H]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k] int64
) -> torch.Tensor:
    """The routed experts' weighted sum, expert by expert (HF `AriaExperts.forward`'s math and
    roundings): [T, H]. The reference of `vlmx.ops.fused_moe` and the path off CUDA."""
    out = torch.zeros_like(x)
    flat_ids = topk_ids.flatten()  # [T * k]
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]  # flat (token, slot) indexes of this expert
        start += count
        tokens = pairs // topk_ids.shape[1]
        gate, up = (x[tokens] @ w_gate_up[expert]).chunk(2, dim=-1)  # [n, I] each
        h = (F.silu(gate) * up) @ w_down[expert]  # [n, H]
        h = h * topk_weights.flatten()[pairs, None]
        out.index_add_(0, tokens, h.to(out.dtype))
    return out


class MoEExperts(nn.Module):
    """The routed experts' stacked weights (HF `AriaExperts`)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))  # [E, H, 2I]
        self.down_proj = nn.Parameter(torch.empty(e, i, h))  # [E, I, H]


class MoERouter(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))  # [E, H]


class MoEMLP(nn.Module):
    """Router + routed experts + shared experts; x [T, H] -> [T, H]. Parameter names follow HF
    (`router.weight`, `experts.gate_up_proj`, `experts.down_proj`, `shared_experts.*` with
    gate/up fused into `shared_experts.gate_up_proj`)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = MoERouter(cfg)
        self.experts = MoEExperts(cfg)
        self.shared_experts = (
            GatedMLP(
                cfg.hidden_size,
                cfg.intermediate_size * cfg.num_shared_experts,
                cfg.shared_act,
                bias=False,
            )
            if cfg.num_shared_experts
            else None
        )

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts alone: [T, H] -> [T, H]."""
        weights, ids = route_topk_softmax(x, self.router.weight, self.cfg.top_k)
        w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
        from vlmx.ops.fused_moe import fused_moe, fused_moe_available

        if x.device.type == "cuda" and fused_moe_available(x, w13, w2):
            return fused_moe(x, w13, w2, weights, ids)
        return moe_experts_torch(x, w13, w2, weights, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.routed(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
