"""The hardware floor of a workload: the time its FLOPs take at the card's dense bf16 rate, or
its bytes at the card's memory bandwidth, whichever is longer.

FLOPs count every matrix product (2 per multiply-add) of the vision tower on every image the run
had to encode, of the decoder on every prompt token not served by the prefix cache and on every
generated token, attention scores and values included (causal: half the square; a cached prefix
is attended to, not recomputed), and the lm_head on sampled positions only. Bytes count what
decoding must read each step: the decoder's weights once per step and each sequence's KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# card -> (dense bf16 FLOP/s, memory bytes/s), as this project measures against them
CARDS = {"H100": (790e12, 3.0e12), "H200": (790e12, 4.3e12)}


def detect_card() -> str | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((card for card in CARDS if card in name), None)


@dataclass(frozen=True)
class WorkItem:
    """One request as the engine ran it."""

    num_prompt_tokens: int
    num_output_tokens: int
    image_patches: list[int]  # patches (before the 2x2 merge) of each image encoded for it
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class Floor:
    flops: float
    bytes: float
    card: str

    @property
    def compute_s(self) -> float:
        return self.flops / CARDS[self.card][0]

    @property
    def memory_s(self) -> float:
        return self.bytes / CARDS[self.card][1]

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)


def meta_model(model_config) -> torch.nn.Module:
    """The family's model built on the meta device (shapes, no memory), for counting."""
    from vlmx.models.registry import get_model_class

    with torch.device("meta"):
        return get_model_class(model_config.architecture)(model_config.hf_config)


def floor_supported(architecture: str) -> bool:
    """Whether `workload_floor` models the family (a Qwen-VL tower; others get no floor)."""
    return architecture.startswith(("Qwen2VL", "Qwen2_5_VL"))


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def workload_floor(
    model: torch.nn.Module,
    hf_config,
    items: list[WorkItem],
    max_num_seqs: int,
    card: str,
    dtype_bytes: int = 2,
) -> Floor:
    """Floor of running `items` on a Qwen-VL-shaped `model` (built on any device, meta too)."""
    text = getattr(hf_config, "text_config", hf_config)
    vision = hf_config.vision_config
    lm = model.language_model
    layer_params = _numel(lm.layers)
    head_params = text.vocab_size * text.hidden_size
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q_dim = text.num_attention_heads * head_dim
    kv_bytes_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
    kv_bytes_per_token *= dtype_bytes

    visual = model.visual
    merger_params = _numel(visual.merger)
    vit_params = _numel(visual) - merger_params
    vit_dim = getattr(vision, "embed_dim", None) or vision.hidden_size
    full_layers = set(getattr(vision, "fullatt_block_indexes", range(vision.depth)))
    window = (getattr(vision, "window_size", 0) // vision.patch_size) ** 2  # patches per window

    flops = 0.0
    kv_bytes = 0.0
    for item in items:
        for n in item.image_patches:
            flops += 2 * n * vit_params + 2 * (n // 4) * merger_params
            for layer in range(vision.depth):
                span = n if layer in full_layers or not window else min(window, n)
                flops += 4 * n * span * vit_dim
        p, o, c = item.num_prompt_tokens, item.num_output_tokens, item.num_cached_tokens
        flops += 2 * (p - c + o) * layer_params + 2 * o * head_params
        # attention: the uncached prompt causally over the whole prefix, then each generated
        # token over its context
        flops += text.num_hidden_layers * 2 * q_dim * (p * p - c * c + 2 * o * p + o * o)
        kv_bytes += kv_bytes_per_token * (o * p + o * (o - 1) / 2)
    max_out = max((i.num_output_tokens for i in items), default=0)
    decode_steps = max_out * math.ceil(len(items) / max_num_seqs)
    weight_bytes = decode_steps * (layer_params + head_params) * dtype_bytes
    return Floor(flops=flops, bytes=weight_bytes + kv_bytes, card=card)
