"""The Phi-3 / Phi-4-mini decoder: vlmx's Llama-style decoder with partial rotary and LongRoPE.

Matches HF `Phi3Model` / the text half of `Phi4MultimodalModel` (transformers 5): RMSNorm,
fused `qkv_proj` ([q | k | v] rows, no bias), `gate_up_proj` ([gate | up] rows, SiLU), no bias
anywhere, RoPE on the first `rotary_dim = head_dim * partial_rotary_factor` dims of each head
(rope_type "default" or "longrope"), residual dropout off at inference.

```
HF checkpoint                               here (layers/decoder.py's DecoderModel)
layers.{i}.self_attn.qkv_proj.weight  ->    layers.{i}.self_attn.qkv_proj (parts q, k, v)
layers.{i}.mlp.gate_up_proj.weight    ->    layers.{i}.mlp.gate_up_proj   (parts gate, up)
```

The checkpoint's fused tensors are cut into their parts on the way in (`split_fused_weights`),
so the stacked layers load them as they load Llama's separate q/k/v.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vlmx.layers.decoder import DecoderConfig, DecoderDims, DecoderModel
from vlmx.layers.rotary import LongRopeEmbedding, RotaryEmbedding

# the decoder's fields of a published Phi-3 / Phi-4 config.json (flat, as Phi3Config takes them)
PHI3_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sliding_window",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
)


@dataclass(slots=True, frozen=True)
class PhiRope:
    """The rotary settings of a Phi-3-style config."""

    rotary_dim: int  # head_dim * partial_rotary_factor
    rope_theta: float
    # LongRoPE (rope_type "longrope") when set; plain RoPE otherwise
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float = 1.0

    @classmethod
    def from_hf(cls, cfg) -> PhiRope:
        """From an HF Phi-3 / Phi-4-multimodal config: `rope_parameters` (transformers 5) or
        `rope_scaling` + `rope_theta` + `partial_rotary_factor` (published configs)."""
        params = dict(getattr(cfg, "rope_parameters", None) or {})
        if not params:
            params = dict(getattr(cfg, "rope_scaling", None) or {})
            params.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
        rope_type = params.get("rope_type", params.get("type", "default"))
        rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type  # HF's aliases
        factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary_dim = int(head_dim * (1.0 if factor is None else factor))
        theta = float(params.get("rope_theta") or 10000.0)
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(
                f"partial_rotary_factor {factor} gives {rotary_dim} rotary dims of a head of "
                f"{head_dim}; it must give an even number in (0, head_dim]"
            )
        if rope_type == "default":
            return cls(rotary_dim, theta)
        if rope_type != "longrope":
            raise ValueError(
                f"rope_type {rope_type!r} is not supported for Phi models; supported: "
                "'default', 'longrope'"
            )
        original = params.get("original_max_position_embeddings") or getattr(
            cfg, "original_max_position_embeddings", None
        )
        if not original:
            raise ValueError("rope_scaling longrope needs original_max_position_embeddings")
        scale = params.get("factor") or cfg.max_position_embeddings / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = (
                1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
            )
        return cls(
            rotary_dim,
            theta,
            tuple(float(f) for f in params["short_factor"]),
            tuple(float(f) for f in params["long_factor"]),
            int(original),
            float(attention_factor),
        )

    def build(self) -> nn.Module:
        """The rotary module: positions [T] -> cos, sin [T, rotary_dim] float32."""
        if self.short_factor is None:
            return RotaryEmbedding(self.rotary_dim, self.rope_theta)
        assert self.long_factor is not None and self.original_max_position_embeddings
        return LongRopeEmbedding(
            self.rotary_dim,
            self.rope_theta,
            list(self.short_factor),
            list(self.long_factor),
            self.original_max_position_embeddings,
            self.attention_factor,
        )


def phi3_decoder_config(cfg, tie_word_embeddings: bool) -> DecoderConfig:
    """The decoder sizes of an HF Phi-3-style config (no biases, SiLU); refuses a sliding
    window the engine would need (vlmx's decoder attends to the whole sequence)."""
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < cfg.max_position_embeddings:
        raise ValueError(
            f"sliding_window={window} is not supported by vlmx's Phi decoder (it attends to the "
            f"whole sequence, up to max_position_embeddings={cfg.max_position_embeddings})"
        )
    return DecoderConfig(
        **DecoderDims.fields_from_hf(cfg),
        rope_theta=PhiRope.from_hf(cfg).rope_theta,
        hidden_act=getattr(cfg, "hidden_act", "silu"),
        tie_word_embeddings=tie_word_embeddings,
    )


class Phi3DecoderModel(DecoderModel):
    """`DecoderModel` with Phi's rotary (partial, LongRoPE): positions [T] only."""

    def __init__(self, cfg: DecoderConfig, rope: PhiRope) -> None:
        super().__init__(cfg)
        self.rotary_emb = rope.build()


def split_fused_weights(
    weights: Iterable[tuple[str, torch.Tensor]], dims: DecoderDims
) -> Iterator[tuple[str, torch.Tensor]]:
    """A Phi checkpoint's fused `*.self_attn.qkv_proj.weight` and `*.mlp.gate_up_proj.weight`
    as their parts (`q_proj` / `k_proj` / `v_proj`, `gate_proj` / `up_proj`); others as they are.

    qkv_proj.weight [(H + 2 * KV) * d, hidden] -> q [H * d], k [KV * d], v [KV * d] rows;
    gate_up_proj.weight [2 * I, hidden] -> gate [I], up [I] rows (HF `Phi3MLP` chunks in two).
    """
    q_size = dims.num_heads * dims.head_dim
    kv_size = dims.num_kv_heads * dims.head_dim
    for name, tensor in weights:
        if name.endswith(".self_attn.qkv_proj.weight"):
            if tensor.shape[0] != q_size + 2 * kv_size:
                raise ValueError(
                    f"weight {name!r} has {tensor.shape[0]} rows; the config's heads need "
                    f"{q_size + 2 * kv_size}"
                )
            stem = name[: -len("qkv_proj.weight")]
            q, k, v = tensor.split([q_size, kv_size, kv_size])
            yield from ((stem + "q_proj.weight", q), (stem + "k_proj.weight", k))
            yield stem + "v_proj.weight", v
        elif name.endswith(".mlp.gate_up_proj.weight"):
            if tensor.shape[0] != 2 * dims.intermediate_size:
                raise ValueError(
                    f"weight {name!r} has {tensor.shape[0]} rows; intermediate_size "
                    f"{dims.intermediate_size} needs {2 * dims.intermediate_size}"
                )
            stem = name[: -len("gate_up_proj.weight")]
            gate, up = tensor.chunk(2)
            yield from ((stem + "gate_proj.weight", gate), (stem + "up_proj.weight", up))
        else:
            yield name, tensor
