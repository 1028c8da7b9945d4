"""Qwen3-VL: a ViT with learned, resampled positions and DeepStack mergers in front of a Qwen3
decoder (per-head q / k RMSNorm, no qkv bias) with interleaved M-RoPE.

HF reference: `transformers.Qwen3VLForConditionalGeneration` (transformers 5). The processor,
the prompt layout and the M-RoPE positions of still images are Qwen2-VL's (`Qwen2VLProcessor`
over the checkpoint's `Qwen2VLImageProcessor` settings: patch 16, merge 2). The interface
methods that read image grids are Qwen2-VL's too; what differs:

```
visual:    layers.qwen3_vision.Qwen3VisionTransformer -> [n, hidden * (1 + k)] per image
embed:     token embeddings widened with k zero blocks (layers.deepstack.widen)
forward:   layers.deepstack.deepstack_forward: level j added after decoder layer j
```

Weight names: `model.language_model.*`, `model.visual.*`, `lm_head.*` (the published layout);
the tower's blocks call their MLP `linear_fc1` / `linear_fc2` (ours: `fc1` / `fc2`).
Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`) is not supported.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from transformers import PretrainedConfig

from vlmx.layers.attention import AttentionMetadata
from vlmx.layers.decoder import DecoderConfig, DecoderModel
from vlmx.layers.deepstack import deepstack_forward, widen
from vlmx.layers.qwen3_vision import Qwen3VisionTransformer
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.loader import text_config
from vlmx.models.qwen2_vl import _PREFIXES, Qwen2VLForConditionalGeneration
from vlmx.models.qwen2_vl_processor import Qwen2VLProcessor  # noqa: F401
from vlmx.multimodal.inputs import MMFeature

# HF `Qwen3VLTextRotaryEmbedding` falls back to this when the config names no section.
DEFAULT_MROPE_SECTION = [24, 20, 20]
# The published image processors' largest image: longest_edge = 16777216 pixels.
MAX_PIXELS = 16777216


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """The vlmx model interface for Qwen3-VL; see `Qwen2VLForConditionalGeneration` for the
    encoder inputs and positions."""

    weight_prefixes = _PREFIXES

    def __init__(self, hf_config: PretrainedConfig) -> None:
        VLMBase.__init__(self)  # NOTE: Qwen2-VL's decoder config is not this one
        self.hf_config = hf_config
        tc = text_config(hf_config)
        config = DecoderConfig.from_hf(
            tc,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            default_mrope_section=DEFAULT_MROPE_SECTION,
        )
        # NOTE: HF interleaves the M-RoPE frequencies whatever `mrope_interleaved` says.
        self.config = dataclasses.replace(config, qk_norm=True, mrope_interleaved=True)
        self.merge_size = hf_config.vision_config.spatial_merge_size
        self.visual = Qwen3VisionTransformer(hf_config.vision_config)
        self.num_deepstack = self.visual.num_deepstack
        if self.num_deepstack > self.config.num_layers:
            raise ValueError(
                f"vision_config.deepstack_visual_indexes has {self.num_deepstack} entries but "
                f"the decoder has only {self.config.num_layers} layers to add them to"
            )
        self.language_model = DecoderModel(self.config)
        self.lm_head = self.build_lm_head(self.config.tie_word_embeddings)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden * (1 + num_deepstack)]: the embeddings, then zero DeepStack levels."""
        return widen(self.language_model.embed_tokens(input_ids), self.num_deepstack)

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden * (1 + num_deepstack)]
        positions: torch.Tensor,  # [3, T] int64
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return deepstack_forward(
            self.language_model,
            inputs_embeds,
            positions,
            kv_caches,
            attn_metadata,
            self.num_deepstack,
        )

    def rename_weight(self, name: str) -> str | None:
        mapped = super().rename_weight(name)
        if mapped is not None and mapped.startswith("visual.blocks."):
            mapped = mapped.replace(".mlp.linear_fc", ".mlp.fc")
        return mapped

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Square images of the published processors' largest size (16384 tokens), or of at most
        `num_embeds` tokens when that is less."""
        vc = self.hf_config.vision_config
        largest = MAX_PIXELS // (vc.patch_size * self.merge_size) ** 2  # tokens of one image
        side = math.isqrt(max(1, min(largest, num_embeds))) * self.merge_size  # patches per side
        dim = self.visual.patch_embed.proj.in_features
        weight = self.embedding

        def data(_: int) -> dict[str, torch.Tensor]:
            pixels = torch.randn(side * side, dim, device=weight.device, dtype=weight.dtype)
            return {"pixel_values": pixels, "image_grid_thw": torch.tensor([1, side, side])}

        return profile_features(num_embeds, side * side // self.merge_size**2, data)

    def build_visual(self, vision_config) -> nn.Module:
        return Qwen3VisionTransformer(vision_config)
