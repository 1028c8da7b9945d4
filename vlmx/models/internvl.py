"""InternVL (transformers-native checkpoints, e.g. OpenGVLab/InternVL3-2B-hf).

InternViT over 448 px tiles -> drop CLS -> pixel shuffle 0.5 -> LayerNorm + Linear-GELU-Linear ->
a Qwen2 (or Llama) decoder with plain 1D RoPE. HF reference:
`transformers.InternVLForConditionalGeneration` (transformers 5.24).

```
pixel_values [T, 3, S, S]  (T tiles of all images of the step)
  -> InternVisionModel                          [T, 1 + (S/p)**2, Dv]     layers/intern_vit.py
  -> drop CLS, pixel_shuffle(scale 2)           [T, (S/2p)**2, 4 * Dv]    layers/pixel_shuffle.py
  -> InternVLProjector                          [T, (S/2p)**2, hidden]
  -> per image: its tiles' rows                 [num_tiles_i * image_seq_length, hidden]
```

Weight names accepted (both map onto this module's `vision_tower.*`, `multi_modal_projector.*`,
`language_model.*`, `lm_head.*`):

```
published / transformers 5 save_pretrained:  vision_tower.*  multi_modal_projector.*
                                             language_model.model.*  language_model.lm_head.*
transformers 4.52+ module names:             model.vision_tower.*  model.multi_modal_projector.*
                                             model.language_model.*  lm_head.*
```
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from vlmx.layers.decoder import DecoderConfig, DecoderModel
from vlmx.layers.intern_vit import InternVisionModel
from vlmx.layers.pixel_shuffle import pixel_shuffle
from vlmx.layers.projector import InternVLProjector
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.internvl_processor import InternVLProcessor, TileSettings  # noqa: F401
from vlmx.models.loader import text_config
from vlmx.multimodal.inputs import MMFeature

# checkpoint prefix -> module prefix, first match wins
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "language_model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
)
_TEXT_MODEL_TYPES = ("qwen2", "llama")


class InternVLWithoutHead(nn.Module):
    """The modules of InternVLForConditionalGeneration but lm_head, for `load_weights_into`."""


class InternVLForConditionalGeneration(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for InternVL.

    `encode_images` reads per image `data["pixel_values"]` ([num_tiles, 3, S, S], processor
    order: grid tiles row-major, then the thumbnail). `forward` takes positions [T] int64.
    """

    uses_mrope = False
    chunk_images = True  # causal attention over image tokens: a chunk may end inside one
    weight_prefixes = _PREFIXES
    # rotary buffers; the pre-training mask token
    skipped_weight_suffixes = (".inv_freq", "embeddings.mask_token")

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        tc = text_config(hf_config)
        if tc.model_type not in _TEXT_MODEL_TYPES:
            raise ValueError(
                f"InternVL with a {tc.model_type!r} language model is not supported by vlmx; "
                f"supported: {', '.join(_TEXT_MODEL_TYPES)}"
            )
        self.config = DecoderConfig.from_hf(
            tc,
            qkv_bias=True if tc.model_type == "qwen2" else None,  # Qwen2: q/k/v bias, no o bias
            o_bias=False if tc.model_type == "qwen2" else None,
            tie_word_embeddings=False,  # NOTE: lm_head always exists; see load_weights
        )
        self.tie_word_embeddings = bool(
            getattr(hf_config, "tie_word_embeddings", False)
            or getattr(tc, "tie_word_embeddings", False)
        )

        vc = hf_config.vision_config
        strategy = getattr(hf_config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy {strategy!r} is not supported; InternVL drops "
                "the CLS token ('default')"
            )
        self.feature_layer = getattr(hf_config, "vision_feature_layer", -1)
        if not isinstance(self.feature_layer, int):
            raise ValueError(
                f"vision_feature_layer {self.feature_layer!r} is not supported; give one int"
            )
        ratio = hf_config.downsample_ratio
        self.scale = int(round(1 / ratio))
        if abs(self.scale * ratio - 1) > 1e-6:
            raise ValueError(f"downsample_ratio {ratio} must be 1 / an integer (e.g. 0.5)")
        image_size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        self.tile_size = image_size
        self.grid = image_size // patch  # patches per side of a tile
        self.tokens_per_tile = (self.grid // self.scale) ** 2

        self.vision_tower = InternVisionModel(vc)
        self.multi_modal_projector = InternVLProjector(
            vc.hidden_size * self.scale**2, self.config.hidden_size, hf_config.projector_hidden_act
        )
        self.language_model = DecoderModel(self.config)
        self.lm_head = self.build_lm_head(tied=False)

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Images of the processor's default max_patches tiles and a thumbnail (12 + 1), or of
        fewer tiles when they would exceed `num_embeds`."""
        largest = TileSettings().max_patches + 1
        num_tiles = min(largest, num_embeds // self.tokens_per_tile)
        num_tiles = num_tiles if num_tiles >= 3 else 1  # a grid of 2+ tiles, or one tile
        weight = self.multi_modal_projector.linear_1.weight
        shape = (num_tiles, 3, self.tile_size, self.tile_size)

        def data(_: int) -> dict[str, torch.Tensor]:
            pixels = torch.randn(shape, device=weight.device, dtype=weight.dtype)
            return {"pixel_values": pixels}

        return profile_features(num_embeds, num_tiles * self.tokens_per_tile, data)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All tiles of all images through the tower in one call; one [num_embeds_i, hidden] each.

        Matches HF `InternVLModel.get_image_features` on the concatenated tiles.
        """
        if not features:
            return []
        weight = self.multi_modal_projector.linear_1.weight
        tiles = [f.data["pixel_values"] for f in features]
        sizes = [t.shape[0] * self.tokens_per_tile for t in tiles]
        for feature, size in zip(features, sizes):
            if feature.num_embeds != size:
                raise ValueError(
                    f"image {feature.mm_hash!r} has {feature.num_embeds} placeholder tokens but "
                    f"its tiles yield {size} embeddings"
                )
        pixel_values = torch.cat(tiles).to(device=weight.device, dtype=weight.dtype)
        x = self.vision_tower(pixel_values, self.feature_layer)[:, 1:]  # [T, grid**2, Dv]
        x = pixel_shuffle(x, self.grid, self.grid, self.scale)  # [T, tokens_per_tile, 4 * Dv]
        embeds = self.multi_modal_projector(x).flatten(0, 1)  # [T * tokens_per_tile, hidden]
        return list(embeds.split(sizes))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a checkpoint; without an lm_head, tie it to the embeddings if the config ties.

        NOTE: HF ties only when the checkpoint lacks one of the two (InternVLConfig defaults to
        tie_word_embeddings=True, yet published checkpoints carry their own lm_head).
        """
        body = InternVLWithoutHead()
        body.vision_tower = self.vision_tower
        body.multi_modal_projector = self.multi_modal_projector
        body.language_model = self.language_model
        head = self.load_weights_but_head(weights, body)
        if head is not None:
            with torch.no_grad():
                self.lm_head.weight.copy_(head)
        elif self.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        else:
            raise ValueError(
                "the checkpoint is missing lm_head.weight and its config does not tie the word "
                "embeddings"
            )
