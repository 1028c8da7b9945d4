"""Qwen2-VL: a ViT with 2D RoPE and a 2x2 patch merger in front of a Qwen2 decoder with M-RoPE.

HF reference: `transformers.Qwen2VLForConditionalGeneration` (transformers 5).

Weight names accepted (both map onto this module's `visual.*`, `language_model.*`, `lm_head.*`):

```
transformers 5:  model.visual.*   model.language_model.{embed_tokens,layers,norm}.*   lm_head.*
hub checkpoints: visual.*         model.{embed_tokens,layers,norm}.*                  lm_head.*
```
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig

from vlmx.layers.decoder import DecoderConfig, DecoderModel
from vlmx.layers.qwen_vision import Qwen2VisionTransformer
from vlmx.layers.vision import Grid
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.loader import text_config
from vlmx.models.qwen2_vl_processor import ImageSettings, Qwen2VLProcessor  # noqa: F401
from vlmx.multimodal.inputs import MMFeature

# HF `Qwen2VLRotaryEmbedding` falls back to this when the config names no section.
DEFAULT_MROPE_SECTION = [16, 24, 24]

# checkpoint prefix -> module prefix, first match wins
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("visual.", "visual."),
    ("model.", "language_model."),
    ("lm_head.", "lm_head."),
)


class Qwen2VLForConditionalGeneration(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for Qwen2-VL.

    `encode_images` reads per image `data["pixel_values"]` ([t*h*w, C*tp*p*p], processor order)
    and `data["image_grid_thw"]` ([3] int64, best on the CPU: it is read on the host).
    `forward` takes positions [3, T] int64 (M-RoPE rows t, h, w).
    """

    uses_mrope = True
    chunk_images = True  # causal attention over image tokens: a chunk may end inside one
    weight_prefixes = _PREFIXES

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.config = DecoderConfig.from_hf(
            text_config(hf_config),
            qkv_bias=True,
            o_bias=False,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            default_mrope_section=DEFAULT_MROPE_SECTION,
        )
        self.merge_size = hf_config.vision_config.spatial_merge_size
        self.visual = self.build_visual(hf_config.vision_config)
        self.language_model = DecoderModel(self.config)
        self.lm_head = self.build_lm_head(self.config.tie_word_embeddings)

    def build_visual(self, vision_config) -> nn.Module:
        return Qwen2VisionTransformer(vision_config)

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Square images of the processor's default max_pixels (1280 tokens), or of at most
        `num_embeds` tokens when that is less."""
        s = ImageSettings()
        largest = s.max_pixels // (s.patch_size * s.merge_size) ** 2  # tokens of one image
        side = math.isqrt(max(1, min(largest, num_embeds))) * self.merge_size  # patches per side
        dim = self.visual.patch_embed.proj.in_features
        weight = self.embedding

        def data(_: int) -> dict[str, torch.Tensor]:
            pixels = torch.randn(side * side, dim, device=weight.device, dtype=weight.dtype)
            return {"pixel_values": pixels, "image_grid_thw": torch.tensor([1, side, side])}

        return profile_features(num_embeds, side * side // self.merge_size**2, data)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All images through the vision tower in one call; one [num_embeds_i, hidden] each."""
        if not features:
            return []
        grid_rows = torch.stack([f.data["image_grid_thw"].reshape(3) for f in features])
        grids: list[Grid] = [(t, h, w) for t, h, w in grid_rows.tolist()]
        weight = self.embedding
        pixel_values = torch.cat([f.data["pixel_values"] for f in features])
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        num_patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != num_patches:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} patches but image_grid_thw "
                f"{grids} describe {num_patches}"
            )
        sizes = [t * h * w // self.merge_size**2 for t, h, w in grids]
        for feature, size in zip(features, sizes):
            if feature.num_embeds != size:
                raise ValueError(
                    f"image {feature.mm_hash!r} has {feature.num_embeds} placeholder tokens but "
                    f"its grid yields {size} embeddings"
                )
        embeds = self.visual(pixel_values, grids)  # [sum(sizes), hidden]
        return list(embeds.split(sizes))
