"""Gemma 3: a SigLIP tower at fixed resolution, average-pooled and projected, in front of a
Gemma 3 decoder (sliding / global layers, image tokens attending bidirectionally).

HF reference: `transformers.Gemma3ForConditionalGeneration` (transformers 5).

```
pixel_values [B, 3, S, S] -> patchify [B * P*P, 3*p*p] -> SiglipVisionTower [B * P*P, Dv]
  -> [B, Dv, P, P] -> AvgPool2d(P / T) -> [B, T*T, Dv] -> GemmaRMSNorm -> @ W [Dv, D]
  -> [B, T*T = mm_tokens_per_image, D]                        (HF `Gemma3MultiModalProjector`)
```

Weight names accepted (both map onto `vision_tower.*`, `multi_modal_projector.*`,
`language_model.*`, and `lm_head.*` unless tied to the embeddings, as in the published ones):

```
transformers 5 modules: model.vision_tower.*  model.multi_modal_projector.*  model.language_model.*
                        lm_head.weight (tied: skipped)
transformers 5 saved:   vision_tower.*  multi_modal_projector.*  language_model.model.*
hub checkpoints:        vision_tower.vision_model.*  multi_modal_projector.*  language_model.model.*
(4.x module names also carry `vision_tower.vision_model.`)
```
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from vlmx.layers.gemma import GemmaConfig, GemmaDecoderModel, GemmaRMSNorm
from vlmx.layers.siglip import SiglipVisionTower, patchify
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.gemma3_processor import Gemma3Processor  # noqa: F401
from vlmx.multimodal.inputs import MMFeature

# checkpoint prefix -> module prefix, first match wins
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)


class Gemma3Projector(nn.Module):
    """Matches HF `Gemma3MultiModalProjector`: [B, P*P, Dv] -> [B, T*T, D]."""

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        vc = hf_config.vision_config
        self.patches_per_side = vc.image_size // vc.patch_size
        tokens_per_side = int(hf_config.mm_tokens_per_image**0.5)
        if tokens_per_side**2 != hf_config.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image={hf_config.mm_tokens_per_image} is no square")
        self.kernel = self.patches_per_side // tokens_per_side
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(vc.hidden_size, hf_config.text_config.hidden_size)
        )
        self.mm_soft_emb_norm = GemmaRMSNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        p = self.patches_per_side
        grid = x.transpose(1, 2).reshape(b, d, p, p)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight)


class Gemma3ForConditionalGeneration(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for Gemma 3.

    `encode_images` reads per feature (an image or one pan-and-scan crop)
    `data["pixel_values"]` [3, S, S]. `forward` takes positions [T] int64.
    """

    uses_mrope = False
    chunk_images = False  # image tokens attend bidirectionally: a span is prefilled in one step
    weight_prefixes = _PREFIXES
    skipped_weight_suffixes = (".inv_freq", ".position_ids")

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.config = GemmaConfig.from_hf(hf_config.text_config)
        self.mm_tokens = hf_config.mm_tokens_per_image
        vc = hf_config.vision_config
        self.image_size, self.patch_size = vc.image_size, vc.patch_size
        self.vision_tower = SiglipVisionTower(vc)
        self.multi_modal_projector = Gemma3Projector(hf_config)
        self.language_model = GemmaDecoderModel(self.config)
        self.lm_head = self.build_lm_head(
            getattr(hf_config.text_config, "tie_word_embeddings", True)
        )

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed(input_ids)  # HF Gemma3TextScaledWordEmbedding

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Images (or crops) at the tower's one size, mm_tokens_per_image embeddings each."""
        weight = self.multi_modal_projector.mm_input_projection_weight
        shape = (3, self.image_size, self.image_size)

        def data(_: int) -> dict[str, torch.Tensor]:
            pixels = torch.randn(shape, device=weight.device, dtype=weight.dtype)
            return {"pixel_values": pixels}

        return profile_features(num_embeds, self.mm_tokens, data)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All images / crops through the tower in one call; one [mm_tokens, hidden] each."""
        if not features:
            return []
        for f in features:
            if f.num_embeds != self.mm_tokens:
                raise ValueError(
                    f"image {f.mm_hash!r} has {f.num_embeds} placeholder tokens; Gemma 3 "
                    f"yields {self.mm_tokens} per image"
                )
        weight = self.multi_modal_projector.mm_input_projection_weight
        pixels = torch.stack([f.data["pixel_values"] for f in features])  # [B, 3, S, S]
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values of {tuple(pixels.shape[-2:])} pixels; the tower takes "
                f"{self.image_size}x{self.image_size}"
            )
        pixels = pixels.to(device=weight.device, dtype=weight.dtype)
        patches = patchify(pixels, self.patch_size)  # [B, P*P, 3*p*p]
        b, n, _ = patches.shape
        cu_seqlens = [i * n for i in range(b + 1)]
        hidden = self.vision_tower(patches.reshape(b * n, -1), cu_seqlens)  # [B*P*P, Dv]
        embeds = self.multi_modal_projector(hidden.view(b, n, -1))  # [B, mm_tokens, D]
        return list(embeds.unbind(0))
