"""Phi-4-multimodal (microsoft/Phi-4-multimodal-instruct), images only.

SigLIP-NaViT over 448 px HD crops -> 2x2 average pooling -> separators -> Linear-GELU-Linear ->
the Phi-4-mini decoder (fused qkv / gate_up, partial rotary with LongRoPE, tied embeddings).
HF reference: `transformers.Phi4MultimodalForCausalLM` (transformers 5; the speech half is not
built).

```
pixel_values [C, 3, S, S] (C crops of all images of the step), patch_mask [C, S/p, S/p]
  -> NaViTSiglipTower (hidden_states[feature_layer])   [C, (S/p)**2, Dv]   layers/siglip_navit.py
  -> AvgPool2d(2)                                      [C, s, s, Dv]       layers/hd_transform.py
  -> per image: sub crops | glb_GN | global, sub_GN closing each row   [n_i, Dv]
  -> img_projection_up -> GELU -> img_projection_down  [n_i, hidden]
```

Weight names accepted (both map onto `model.*`, `image_embed.img_processor.*`, `image_embed.*`):

```
transformers (model_type phi4_multimodal):  model.embed_tokens.* model.layers.* model.norm.*
    model.embed_tokens_extend.image_embed.{img_processor.*, global_img_feature_extensor,
    sub_img_feature_extensor, img_projection_up.*, img_projection_down.*}   [lm_head.weight]
published (model_type phi4mm, Phi4MMForCausalLM): the same, but
    model.embed_tokens_extend.image_embed.{glb_GN, sub_GN, img_projection.0.*, img_projection.2.*}
    and the decoder's LoRA-wrapped layers: *.base_layer.weight (the base weights), *.lora_A.* /
    *.lora_B.* (the baked-in adapters, skipped: `vision-lora/` holds the vision adapter)
both: model.embed_tokens_extend.audio_embed.* (speech, skipped), the tower's post_layernorm,
    head and layers past feature_layer (never run, skipped)
```
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PretrainedConfig

from vlmx.layers.hd_transform import PUBLISHED_HD_NAMES, HDImageProjection, num_hd_tokens
from vlmx.layers.phi3 import Phi3DecoderModel, PhiRope, phi3_decoder_config, split_fused_weights
from vlmx.layers.siglip_navit import NaViTSiglipTower
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.phi4mm_processor import HDSettings, Phi4MMProcessor  # noqa: F401
from vlmx.multimodal.inputs import MMFeature

_IMAGE_EMBED = "model.embed_tokens_extend.image_embed."


class ImageEmbed(HDImageProjection):
    """HF `Phi4MultimodalImageEmbedding`: the tower (`img_processor`) and the HD projection."""

    def __init__(self, vision_config, hidden_size: int) -> None:
        super().__init__(vision_config.hidden_size, hidden_size)
        self.img_processor = NaViTSiglipTower(vision_config, vision_config.feature_layer)


class Phi4MMForCausalLM(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for Phi-4-multimodal.

    `encode_images` reads per image `data["pixel_values"]` ([1 + n, 3, S, S]: global view, then
    the grid row-major), `data["patch_mask"]` ([1 + n, S/p, S/p] bool) and `data["hd_layout"]`
    ([4] int64: rows, cols, valid compressed rows, valid compressed columns). Positions [T].
    """

    uses_mrope = False
    chunk_images = True  # causal attention over image tokens: a chunk may end inside one
    decoder_name = "model"  # the checkpoint's names: model.layers.{i}.self_attn.qkv_proj, ...
    # NOTE: the published vision-lora targets qkv_proj / gate_up_proj / o_proj / down_proj by
    # the checkpoint's names, which are this module's (fused layers adapted whole)
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
        if vision.image_size != getattr(vision, "crop_size", vision.image_size):
            raise ValueError(
                f"vision crop_size {vision.crop_size} differs from image_size {vision.image_size}"
            )
        self.side = vision.image_size // vision.patch_size
        if self.side % 2:
            raise ValueError("Phi-4's 2x2 token compression needs an even number of patches")
        self.crop_size = vision.image_size
        self.image_token_id = getattr(vision, "image_token_id", None)
        self.image_embed = ImageEmbed(vision, self.config.hidden_size)
        self.model = Phi3DecoderModel(self.config, PhiRope.from_hf(hf_config))
        self.lm_head = self.build_lm_head(tied)

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Images of the processor's default largest grid (dynamic_hd = 36: 6 x 6 crops and the
        global view), or of the largest square grid whose tokens fit in `num_embeds` (1 x 1 at
        least)."""
        s = self.side // 2
        grid = 1
        for n in range(int(HDSettings().dynamic_hd ** 0.5), 0, -1):
            if num_hd_tokens(n * s, n * s, self.side) <= num_embeds:
                grid = n
                break
        per_image = num_hd_tokens(grid * s, grid * s, self.side)
        weight = self.image_embed.img_projection_up.weight
        shape = (1 + grid * grid, 3, self.crop_size, self.crop_size)

        def data(_: int) -> dict[str, torch.Tensor]:
            return {
                "pixel_values": torch.randn(shape, device=weight.device, dtype=weight.dtype),
                "patch_mask": torch.ones(
                    shape[0], self.side, self.side, dtype=torch.bool, device=weight.device
                ),
                "hd_layout": torch.tensor([grid, grid, grid * s, grid * s]),
            }

        return profile_features(num_embeds, per_image, data)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All crops of all images through the tower in one call; one [num_embeds_i, hidden]
        each. Matches HF `Phi4MultimodalImageEmbedding.forward` image by image."""
        if not features:
            return []
        embed = self.image_embed
        weight = embed.img_projection_up.weight
        layouts = [tuple(int(v) for v in f.data["hd_layout"].tolist()) for f in features]
        for feature, (rows, cols, uh, uw) in zip(features, layouts):
            size = num_hd_tokens(uh, uw, self.side)
            num_crops = feature.data["pixel_values"].shape[0]
            if feature.num_embeds != size or num_crops != 1 + rows * cols:
                raise ValueError(
                    f"image {feature.mm_hash!r} has {feature.num_embeds} placeholder tokens and "
                    f"{num_crops} crops, but its layout {rows}x{cols} yields {size} embeddings "
                    f"from {1 + rows * cols} crops"
                )
        crops = torch.cat([f.data["pixel_values"] for f in features])
        crops = crops.to(device=weight.device, dtype=weight.dtype)  # [C, 3, S, S]
        masks = torch.cat([f.data["patch_mask"] for f in features]).to(weight.device)
        hidden = embed.img_processor(crops, masks)  # [C, side * side, Dv]
        pooled = embed.compress(hidden, self.side)  # [C, s, s, Dv]
        per_image = pooled.split([f.data["pixel_values"].shape[0] for f in features])
        tokens = torch.cat([embed.layout(p, lay) for p, lay in zip(per_image, layouts)])
        return list(embed.project(tokens).split([f.num_embeds for f in features]))

    def rename_weight(self, name: str) -> str | None:
        """Both layouts' names -> this module's (None: a tensor that is no parameter here)."""
        if (
            ".lora_A." in name
            or ".lora_B." in name
            or name.startswith("model.embed_tokens_extend.audio_embed.")
        ):
            return None
        if name.startswith(_IMAGE_EMBED):
            rest = name[len(_IMAGE_EMBED) :]
            for published, ours in PUBLISHED_HD_NAMES:  # below _IMAGE_EMBED
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
        unwrapped = ((name.replace(".base_layer.", "."), t) for name, t in weights)
        super().load_weights(split_fused_weights(unwrapped, self.config))
