"""The Mllama (Llama 3.2 Vision) decoder on a flat batch: Llama 3 self-attention layers (paged
KV, llama3 RoPE) with gated cross-attention layers at `cross_attention_layers`.

Matches HF `MllamaTextModel` (transformers 5.24):

```
embed (vocab + 8 rows) -> layers.{i}: DecoderLayer (paged KV)                  layers/decoder.py
                          or, at cross_attention_layers, CrossAttentionDecoderLayer
                          (reads AttentionMetadata.cross_attention; skipped when None)
                       -> norm
```
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmx.layers.attention import AttentionMetadata
from vlmx.layers.cross_attention import CrossAttentionDecoderLayer
from vlmx.layers.decoder import DecoderConfig, DecoderDims, DecoderLayer
from vlmx.layers.norm import RMSNorm
from vlmx.layers.rotary import RotaryEmbedding, _inv_freq, _InvFreq


def llama3_inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    """HF `_compute_llama3_parameters`: the default frequencies, long wavelengths divided by
    `factor`, the band between smoothed. [head_dim / 2] float32."""
    inv_freq = _inv_freq(head_dim, float(params["rope_theta"]))
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def text_decoder_config(tc) -> DecoderConfig:
    """The self-attention layers' config (num_layers: those layers only)."""
    params = dict(getattr(tc, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"Mllama with rope_type {rope_type!r} is not supported; supported: default, llama3"
        )
    num_self = tc.num_hidden_layers - len(tc.cross_attention_layers)
    dims = DecoderDims.fields_from_hf(tc)
    return DecoderConfig(
        **{**dims, "num_layers": num_self},
        rope_theta=float(params.get("rope_theta", 500000.0)),
        hidden_act=tc.hidden_act,
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
    )


class MllamaTextModel(nn.Module):
    """HF `MllamaTextModel` on a flat batch: `layers.{i}` is a `DecoderLayer` (paged KV) or, at
    `cross_attention_layers`, a `CrossAttentionDecoderLayer`, under HF's indices."""

    def __init__(self, tc) -> None:
        super().__init__()
        self.cfg = text_decoder_config(tc)
        cross = sorted(tc.cross_attention_layers)
        self.embed_tokens = nn.Embedding(tc.vocab_size + 8, tc.hidden_size)
        self.layers = nn.ModuleList(
            CrossAttentionDecoderLayer(self.cfg, cross.index(i))
            if i in cross
            else DecoderLayer(self.cfg)
            for i in range(tc.num_hidden_layers)
        )
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(self.cfg.head_dim, self.cfg.rope_theta)
        params = dict(getattr(tc, "rope_parameters", None) or {})
        if params.get("rope_type") == "llama3":
            self.rotary_emb._inv_freq = _InvFreq(llama3_inv_freq(self.cfg.head_dim, params))

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[torch.Tensor],  # one per self-attention layer
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        cos, sin = self.rotary_emb(positions)
        cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        caches = iter(kv_caches)
        x = inputs_embeds
        for layer in self.layers:
            if isinstance(layer, CrossAttentionDecoderLayer):
                x = layer(x, attn_metadata.cross_attention)
            else:
                x = layer(x, cos, sin, next(caches), attn_metadata)
        assert next(caches, None) is None, "one KV cache per self-attention layer"
        return self.norm(x)
