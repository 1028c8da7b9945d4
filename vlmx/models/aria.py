"""Aria: an Idefics3-style SigLIP tower, a query cross-attention projector, an MoE decoder.

HF reference: `transformers.AriaForConditionalGeneration` (transformers 5):

```
crops [C, 3, M, M] (valid part h x w of each) --valid patches, R x C = ceil(h/p) x ceil(w/p)-->
  Idefics3VisionTransformer, last layer's output before post_layernorm
  (vision_feature_layer -1: hidden_states[-1])                      [sum R*C, D_v]
  --AriaProjector (layers/query_projector.py)--> [C, Q, hidden]     Q = patch_to_query[(M/p)**2]
decoder: AriaTextModel = Llama attention + AriaTextMoELayer (layers/moe.py) in every layer
```

Padded patches of a crop are left out of the tower (HF masks them out of its attention and of
the projector's), so each crop is one varlen segment of its valid patches, at the position ids
HF's bucketing gives them (`idefics3.vision_position_ids`).

Weight names (transformers 5 `save_pretrained` = the hub layout of rhymes-ai/Aria):

```
language_model.model.*  language_model.lm_head.weight  vision_tower.*  multi_modal_projector.*
language_model.model.layers.{i}.mlp.experts.fc1.weight [E, H, 2I] / fc2.weight [E, I, H]
```
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from vlmx.layers.attention import VarlenSegments
from vlmx.layers.decoder import DecoderConfig, DecoderModel
from vlmx.layers.moe import MoEConfig, MoEMLP, rename_moe_weight
from vlmx.layers.query_projector import QueryProjector
from vlmx.layers.siglip import SiglipVisionTower, patchify
from vlmx.models.aria_processor import AriaImageSettings, AriaProcessor  # noqa: F401
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.idefics3 import vision_position_ids
from vlmx.multimodal.inputs import MMFeature

# checkpoint prefix -> module prefix, first match wins
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "language_model."),  # hub / save_pretrained
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "language_model."),  # transformers 5 module names
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_tower.vision_model.", "vision_tower."),  # a SigLIP-style tower prefix
)


class AriaForConditionalGeneration(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for Aria.

    `encode_images` reads per image `data["pixel_values"]` ([num_crops, 3, M, M]) and
    `data["valid_size"]` ([num_crops, 2] int64, each crop's unpadded height and width)."""

    uses_mrope = False
    chunk_images = True  # causal attention over image tokens: a chunk may end inside one
    decoder_name = "language_model"
    weight_prefixes = _PREFIXES

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        text = hf_config.text_config
        self.config = DecoderConfig.from_hf(
            text, tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False))
        )
        vision = hf_config.vision_config
        if getattr(hf_config, "vision_feature_layer", -1) != -1:
            raise ValueError(
                f"vision_feature_layer={hf_config.vision_feature_layer} is not supported for "
                "Aria; vlmx reads the tower's last layer (-1), as the published checkpoints do"
            )
        self.patch_size = vision.patch_size
        self.num_patches_per_side = vision.image_size // vision.patch_size
        self.image_token_id = hf_config.image_token_index
        self.vision_tower = SiglipVisionTower(vision)
        patch_to_query = {
            int(k): int(v) for k, v in hf_config.projector_patch_to_query_dict.items()
        }
        self.multi_modal_projector = QueryProjector(
            vision.hidden_size, vision.num_attention_heads, text.hidden_size, patch_to_query
        )
        self.language_model = DecoderModel(self.config)
        moe = MoEConfig.from_aria(text)
        # NOTE: AriaTextDecoderLayer has the MoE in every layer (no dense first layers); the
        # shared decoder's dense MLPs (intermediate_size wide, a few % of the MoE) are replaced
        for layer in self.language_model.layers:
            layer.mlp = MoEMLP(moe)
        self.lm_head = self.build_lm_head(self.config.tie_word_embeddings)

    def rename_weight(self, name: str) -> str | None:
        mapped = super().rename_weight(name)
        return None if mapped is None else rename_moe_weight(mapped)

    def vision_features(
        self,
        patches: torch.Tensor,  # [N, 3 * p * p]
        cu_seqlens: list[int],  # one segment per crop
        positions: torch.Tensor,  # [N] int64
    ) -> torch.Tensor:
        """The tower's last encoder layer (hidden_states[-1], no post_layernorm): [N, D_v]."""
        tower = self.vision_tower
        x = tower.embeddings(patches, positions)
        segments = VarlenSegments(cu_seqlens)
        for layer in tower.encoder.layers:
            x = layer(x, segments)
        return x

    def crop_features(
        self, crops: list[torch.Tensor], valid_size: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Crops of one canvas size, each [3, M, M] -> [C, Q, hidden] (HF `get_image_features`).

        Only each crop's valid patches are cut out (no copy of the whole canvases)."""
        p = self.patch_size
        patches, positions, cu_seqlens = [], [], [0]
        for crop, (height, width) in zip(crops, valid_size):
            rows, cols = -(-height // p), -(-width // p)
            patches.append(patchify(crop[None, :, : rows * p, : cols * p], p)[0])
            positions.append(
                vision_position_ids(rows, cols, self.num_patches_per_side, crop.device)
            )
            cu_seqlens.append(cu_seqlens[-1] + rows * cols)
        hidden = self.vision_features(torch.cat(patches), cu_seqlens, torch.cat(positions))
        canvas_patches = (crops[0].shape[-2] // p) * (crops[0].shape[-1] // p)
        return self.multi_modal_projector(hidden, cu_seqlens, canvas_patches)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All images' crops, one tower + projector call per canvas size; one
        [num_crops * Q, hidden] tensor per image."""
        if not features:
            return []
        weight = self.embedding
        pixels = [f.data["pixel_values"].to(weight.device, weight.dtype) for f in features]
        sizes = [[tuple(s) for s in f.data["valid_size"].tolist()] for f in features]
        by_canvas: dict[tuple[int, int], list[int]] = {}
        for i, crops in enumerate(pixels):
            by_canvas.setdefault(tuple(crops.shape[-2:]), []).append(i)
        per_image: list[torch.Tensor] = [None] * len(features)  # type: ignore[list-item]
        for idxs in by_canvas.values():
            crops = [crop for i in idxs for crop in pixels[i]]
            feats = self.crop_features(crops, [s for i in idxs for s in sizes[i]])
            for i, chunk in zip(idxs, feats.split([pixels[i].shape[0] for i in idxs])):
                per_image[i] = chunk.flatten(0, 1)  # [num_crops * Q, hidden]
        for feature, embeds in zip(features, per_image):
            if feature.num_embeds != embeds.shape[0]:
                raise ValueError(
                    f"image {feature.mm_hash!r} has a placeholder of {feature.num_embeds} "
                    f"tokens, but its crops yield {embeds.shape[0]} features"
                )
        return per_image

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Images of the processor's default: one crop of max_image_size (no splitting), as
        many as fit `num_embeds` (at least one)."""
        m = AriaImageSettings().max_image_size
        per_image = self.multi_modal_projector.num_queries((m // self.patch_size) ** 2)
        weight = self.embedding
        # NOTE: one canvas shared by the dummy images: what the step holds is their patches
        canvas = torch.randn((1, 3, m, m), device=weight.device, dtype=weight.dtype)

        def data(_: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": canvas, "valid_size": torch.tensor([[m, m]])}

        return profile_features(num_embeds, per_image, data)
