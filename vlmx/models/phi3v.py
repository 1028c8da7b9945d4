"""Phi-3.5-vision (microsoft/Phi-3.5-vision-instruct, model_type phi3_v, `Phi3VForCausalLM`).

CLIP ViT-L/14-336 over 336 px HD crops (hidden_states[-2], patches only) -> 2x2 merge by
concatenation -> separators -> Linear-GELU-Linear -> the Phi-3 decoder (fused qkv / gate_up,
LongRoPE "su" scaling, untied lm_head). The published checkpoint runs with its own code
(`trust_remote_code`); vlmx reads its layout with its own classes and runs none of it.
Reference: transformers' `CLIPVisionModel` + `Phi3ForCausalLM` with the HD transform
(tests/test_phi3v.py).

```
pixel_values [C, 3, 336, 336] (C crops of all images of the step)
  -> CLIPVisionTower (hidden_states[feature_layer], no class token)  [C, 576, Dv]  layers/clip.py
  -> merge_2x2                                                 [C, 12, 12, 4 Dv]   hd_transform.py
  -> per image: sub crops | glb_GN | global, sub_GN closing each row   [n_i, 4 Dv]
  -> img_projection.0 -> GELU -> img_projection.2                      [n_i, hidden]
```

Published weight names (onto `image_embed.img_processor.*`, `image_embed.*`, `model.*`):

```
model.embed_tokens.* model.layers.{i}.{self_attn.qkv_proj, self_attn.o_proj,
    mlp.gate_up_proj, mlp.down_proj, input_layernorm, post_attention_layernorm} model.norm.*
model.vision_embed_tokens.img_processor.vision_model.*   (CLIP; post_layernorm and layers
    past feature_layer skipped)
model.vision_embed_tokens.{glb_GN, sub_GN, img_projection.0.*, img_projection.2.*}
model.vision_embed_tokens.wte.weight   (the decoder's embedding again, where present: skipped)
lm_head.weight
```
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PretrainedConfig

from vlmx.layers.clip import CLIPVisionTower
from vlmx.layers.hd_transform import (
    PUBLISHED_HD_NAMES,
    HDImageProjection,
    merge_2x2,
    num_hd_tokens,
)
from vlmx.layers.phi3 import Phi3DecoderModel, PhiRope, phi3_decoder_config, split_fused_weights
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.phi3v_processor import Phi3VProcessor, Phi3VSettings  # noqa: F401
from vlmx.multimodal.inputs import MMFeature

_IMAGE_EMBED = "model.vision_embed_tokens."
# published name (below _IMAGE_EMBED) -> the name below `image_embed.` here
_PUBLISHED_NAMES = (*PUBLISHED_HD_NAMES, ("img_processor.vision_model.", "img_processor."))


class ImageEmbed(HDImageProjection):
    """The published `Phi3HDImageEmbedding`: the CLIP tower and the HD projection."""

    def __init__(self, vision_config, feature_layer: int, hidden_size: int) -> None:
        super().__init__(4 * vision_config.hidden_size, hidden_size)
        self.img_processor = CLIPVisionTower(vision_config, feature_layer)


class Phi3VForCausalLM(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for Phi-3.5-vision.

    `encode_images` reads per image `data["pixel_values"]` ([1 + h*w, 3, S, S]: global view,
    then the grid row-major) and `data["hd_layout"]` ([2] int64: rows h, columns w). Positions
    [T].
    """

    uses_mrope = False
    chunk_images = True  # causal attention over image tokens: a chunk may end inside one
    decoder_name = "model"
    weight_prefixes = (
        (_IMAGE_EMBED, "image_embed."),
        ("model.", "model."),
        ("lm_head.", "lm_head."),
    )

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.config = phi3_decoder_config(hf_config, tie_word_embeddings=tied)
        vision = hf_config.vision_config
        self.side = vision.image_size // vision.patch_size
        if self.side % 2:
            raise ValueError("Phi-3-vision's 2x2 token merge needs an even number of patches")
        self.crop_size = vision.image_size
        self.image_token_id = getattr(hf_config, "image_token_id", None)
        feature_layer = int(getattr(hf_config, "feature_layer", -2))
        self.image_embed = ImageEmbed(vision, feature_layer, self.config.hidden_size)
        self.model = Phi3DecoderModel(self.config, PhiRope.from_hf(hf_config))
        self.lm_head = self.build_lm_head(tied)

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Images of the processor's default crop limit (num_crops 16: a 4 x 4 grid), or of
        the largest square grid whose tokens fit in `num_embeds` (1 x 1 at least)."""
        s = self.side // 2
        grid = 1
        for n in range(int(Phi3VSettings().num_crops ** 0.5), 0, -1):
            if num_hd_tokens(n * s, n * s, self.side) <= num_embeds:
                grid = n
                break
        per_image = num_hd_tokens(grid * s, grid * s, self.side)
        weight = self.image_embed.img_projection_up.weight
        shape = (1 + grid * grid, 3, self.crop_size, self.crop_size)

        def data(_: int) -> dict[str, torch.Tensor]:
            return {
                "pixel_values": torch.randn(shape, device=weight.device, dtype=weight.dtype),
                "hd_layout": torch.tensor([grid, grid]),
            }

        return profile_features(num_embeds, per_image, data)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All crops of all images through the tower in one call; one [num_embeds_i, hidden]
        each. Matches the published `Phi3HDImageEmbedding` image by image."""
        if not features:
            return []
        embed = self.image_embed
        weight = embed.img_projection_up.weight
        s = self.side // 2
        layouts = []
        for feature in features:
            rows, cols = (int(v) for v in feature.data["hd_layout"].tolist())
            size = num_hd_tokens(rows * s, cols * s, self.side)
            num_crops = feature.data["pixel_values"].shape[0]
            if feature.num_embeds != size or num_crops != 1 + rows * cols:
                raise ValueError(
                    f"image {feature.mm_hash!r} has {feature.num_embeds} placeholder tokens and "
                    f"{num_crops} crops, but its layout {rows}x{cols} yields {size} embeddings "
                    f"from {1 + rows * cols} crops"
                )
            layouts.append((rows, cols, rows * s, cols * s))
        crops = torch.cat([f.data["pixel_values"] for f in features])
        crops = crops.to(device=weight.device, dtype=weight.dtype)  # [C, 3, S, S]
        merged = merge_2x2(embed.img_processor(crops), self.side)  # [C, s, s, 4 Dv]
        per_image = merged.split([f.data["pixel_values"].shape[0] for f in features])
        tokens = torch.cat([embed.layout(p, lay) for p, lay in zip(per_image, layouts)])
        return list(embed.project(tokens).split([f.num_embeds for f in features]))

    def rename_weight(self, name: str) -> str | None:
        """The published names -> this module's (None: a tensor that is no parameter here)."""
        if name.startswith(_IMAGE_EMBED):
            rest = name[len(_IMAGE_EMBED) :]
            if rest.startswith("wte."):
                return None  # the decoder's embed_tokens, shared by the published embedding
            for published, ours in _PUBLISHED_NAMES:
                if rest.startswith(published):
                    rest = ours + rest[len(published) :]
                    break
            tower = "img_processor."
            if rest.startswith(tower) and self.image_embed.img_processor.unused_weight(
                rest[len(tower) :]
            ):
                return None
            name = _IMAGE_EMBED + rest
        return super().rename_weight(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(split_fused_weights(weights, self.config))
