"""DeepStack (Qwen3-VL): features of inner vision-tower layers added into the hidden states of
the first decoder layers at the image tokens' rows.

An image's encoder output carries its DeepStack levels as extra columns (`qwen3_vision`), and
the model's token embeddings get as many zero blocks (`widen`), so the runner's merge copies an
image's rows into the step as for any other family. The decoder then splits the columns:

```
inputs_embeds [T, hidden * (1 + k)]  =  x | level 0 | ... | level k-1      (levels: 0 on text)
layer j < k:   x = layer_j(x) + level j          (HF `Qwen3VLTextModel._deepstack_process`,
layer j >= k:  x = layer_j(x)                     which adds at the image rows only)
```
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmx.layers.attention import AttentionMetadata
from vlmx.layers.decoder import DecoderModel


def widen(embeds: torch.Tensor, num_levels: int) -> torch.Tensor:
    """[T, hidden] token embeddings -> [T, hidden * (1 + num_levels)], the levels zero."""
    return F.pad(embeds, (0, embeds.shape[-1] * num_levels))


def deepstack_forward(
    decoder: DecoderModel,
    inputs_embeds: torch.Tensor,  # [T, hidden * (1 + num_levels)]
    positions: torch.Tensor,  # [T] or [3, T] int64
    kv_caches: list[torch.Tensor],
    attn_metadata: AttentionMetadata,
    num_levels: int,
) -> torch.Tensor:
    """`DecoderModel.forward` with level j added after layer j: [T, hidden] after the norm."""
    hidden = decoder.cfg.hidden_size
    if inputs_embeds.shape[-1] != hidden * (1 + num_levels):
        raise ValueError(
            f"inputs_embeds have {inputs_embeds.shape[-1]} columns; a DeepStack decoder of "
            f"hidden {hidden} with {num_levels} levels takes {hidden * (1 + num_levels)}"
        )
    x, *levels = inputs_embeds.split(hidden, dim=-1)  # [T, hidden] views each
    if num_levels > len(decoder.layers):
        raise ValueError(f"{num_levels} DeepStack levels for {len(decoder.layers)} layers")
    cos, sin = decoder.rotary_emb(positions)
    cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
    x = x.contiguous()
    for i, (layer, kv_cache) in enumerate(zip(decoder.layers, kv_caches, strict=True)):
        x = layer(x, cos, sin, kv_cache, attn_metadata)
        if i < num_levels:
            x = x + levels[i]
    return decoder.norm(x)
