"""Gemma 3 decoder over a flat varlen batch with a paged KV cache.

Differs from `decoder.DecoderModel` (Llama/Qwen2) in ways that touch every layer, hence its own
file:

- RMSNorm scales by `(1 + weight)` in float32 (HF `Gemma3RMSNorm`), four norms per layer
  (input, post-attention, pre-feedforward, post-feedforward);
- q and k are RMS-normalised per head (`q_norm`, `k_norm` over head_dim) before RoPE;
- scores are scaled by `query_pre_attn_scalar ** -0.5`, not `head_dim ** -0.5`;
- layers are `sliding_attention` (window `sliding_window`, own RoPE base) or `full_attention`
  (global, own RoPE base and scaling), following `config.layer_types`;
- embeddings are multiplied by `sqrt(hidden_size)`, rounded to the weights' dtype;
- the MLP is gated with `gelu_pytorch_tanh`.

Parameter names follow HF `Gemma3TextModel` (q/k/v and gate/up fused by `load_weights_into`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmx.layers.attention import AttentionMetadata
from vlmx.layers.decoder import DecoderAttention, DecoderDims
from vlmx.layers.mlp import GatedMLP
from vlmx.layers.rotary import RotaryEmbedding


class GemmaRMSNorm(nn.Module):
    """Matches HF `Gemma3RMSNorm`: `(x / rms(x)) * (1 + w)` in float32, cast back. [..., d]"""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def _rope(params: dict) -> tuple[float, float]:
    """(rope_theta, linear factor) of one layer type's `rope_parameters` entry."""
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return float(params["rope_theta"]), 1.0
    if rope_type == "linear":
        return float(params["rope_theta"]), float(params["factor"])
    raise ValueError(
        f"rope_type {rope_type!r} is not supported for Gemma 3; supported: 'default', 'linear'"
    )


@dataclass(slots=True, frozen=True)
class GemmaConfig(DecoderDims):
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope: tuple[tuple[str, float, float], ...]  # (layer type, theta, linear factor)
    hidden_act: str = "gelu_pytorch_tanh"
    attention_bias: bool = False

    @classmethod
    def from_hf(cls, cfg) -> GemmaConfig:
        """From an HF `Gemma3TextConfig` (transformers 5: `rope_parameters` per layer type)."""
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(cfg, key, None) is not None:
                raise ValueError(f"Gemma 3 config sets {key}; vlmx does not support softcapping")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True is not supported by vlmx")
        layer_types = tuple(cfg.layer_types)
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"unknown Gemma 3 layer types {sorted(unknown)}")
        rope = tuple((t, *_rope(cfg.rope_parameters[t])) for t in sorted(set(layer_types)))
        return cls(
            **DecoderDims.fields_from_hf(cfg),
            query_pre_attn_scalar=float(cfg.query_pre_attn_scalar),
            sliding_window=int(cfg.sliding_window),
            layer_types=layer_types,
            rope=rope,
            hidden_act=cfg.hidden_activation,
            attention_bias=bool(getattr(cfg, "attention_bias", False)),
        )


class GemmaAttention(DecoderAttention):
    """Matches HF `Gemma3Attention`: the shared decoder attention with per-head q_norm / k_norm
    before RoPE, the `query_pre_attn_scalar` scale, and a sliding window on sliding layers."""

    def __init__(self, cfg: GemmaConfig, sliding: bool) -> None:
        super().__init__(
            cfg,
            qkv_bias=cfg.attention_bias,
            o_bias=cfg.attention_bias,
            scale=cfg.query_pre_attn_scalar**-0.5,
            sliding_window=cfg.sliding_window if sliding else None,
        )
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class GemmaDecoderLayer(nn.Module):
    """Matches HF `Gemma3DecoderLayer` (sandwich norms around attention and MLP)."""

    def __init__(self, cfg: GemmaConfig, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = GemmaAttention(cfg, sliding=layer_type == "sliding_attention")
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos, sin, kv_cache, attn_metadata) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn_metadata)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class GemmaDecoderModel(nn.Module):
    """Matches HF `Gemma3TextModel` on a flat batch: [T, hidden] embeddings -> [T, hidden]."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = nn.ModuleDict(
            {t: RotaryEmbedding(cfg.head_dim, theta, None, factor) for t, theta, factor in cfg.rope}
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """HF `Gemma3TextScaledWordEmbedding`: the scale is rounded to the weights' dtype."""
        weight = self.embed_tokens.weight
        scale = torch.tensor(self.cfg.hidden_size**0.5, dtype=weight.dtype, device=weight.device)
        return self.embed_tokens(input_ids) * scale

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        tables = {}
        for layer_type, rotary in self.rotary.items():
            cos, sin = rotary(positions)  # [T, head_dim] float32, cast as HF does
            tables[layer_type] = (cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype))
        x = inputs_embeds
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, *tables[layer.layer_type], kv_cache, attn_metadata)
        return self.norm(x)
