"""Pixtral (Llava with a Pixtral vision tower) and Mistral 3: Pixtral ViT -> projector -> Mistral.

HF references (transformers 5.24): `LlavaForConditionalGeneration` with a `PixtralVisionConfig`
(e.g. mistral-community/pixtral-12b) and `Mistral3ForConditionalGeneration` (e.g.
mistralai/Mistral-Small-3.1-24B-Instruct-2503). Both share the vision tower
(`layers/pixtral_vision.py`), the processor (`pixtral_processor.py`) and a Mistral decoder
(`layers/decoder.py`, Llama-style, no biases). They differ in the projector
(`layers/projector.py`):

```
Llava:     hidden_states[vision_feature_layer(s)] (concatenated)  [N, D * L]
           -> linear_1 -> act -> linear_2                          [N, hidden]
Mistral 3: hidden_states[vision_feature_layer]                    [N, D]
           -> RMSNorm -> patch merger (each m x m block of patches concatenated, then
              merging_layer)                                       [N / m^2, D]
           -> linear_1 -> act -> linear_2                          [N / m^2, hidden]
```

Weight names accepted (both map onto this module's `vision_tower.*`, `multi_modal_projector.*`,
`language_model.*`, `lm_head.*`):

```
transformers 5:  model.vision_tower.*  model.multi_modal_projector.*  model.language_model.*
                 lm_head.*
hub checkpoints: vision_tower.*        multi_modal_projector.*        language_model.model.*
                 language_model.lm_head.*
```
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from vlmx.layers.decoder import DecoderConfig, DecoderModel
from vlmx.layers.pixtral_vision import Grid2D, PixtralVisionTower
from vlmx.layers.projector import Mistral3Projector, ProjectorMLP
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.loader import text_config
from vlmx.models.pixtral_processor import (
    PixtralProcessor,
    check_pixtral_vision,
    image_token_layout,
)
from vlmx.multimodal.inputs import MMFeature

__all__ = [
    "LlavaPixtralForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
    "PixtralProcessor",
]

# checkpoint prefix -> module prefix, first match wins
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
)


class _PixtralVLM(VLMBase):
    """What both families share: vision tower, Mistral decoder, image-block layout, loading.

    `encode_images` reads per image `data["pixel_values"]` ([(h / p) * (w / p), 3 * p * p],
    row-major patches) and `data["image_size"]` ([2] int64 resized (h, w), on the CPU). It returns
    one row per token of the image's block, whose ids are `data["token_ids"]` ([num_embeds]
    int64, CPU; see `pixtral_processor`): the image features at the [IMG] rows, the token
    embeddings of [IMG_BREAK] / [IMG_END] at theirs, so the runner copies the block as one span.
    """

    uses_mrope = False
    chunk_images = True  # causal attention over image tokens: a chunk may end inside one
    merge_size = 1
    weight_prefixes = _PREFIXES

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        check_pixtral_vision(hf_config)
        self.hf_config = hf_config
        tc = text_config(hf_config)  # a `sliding_window` slides every layer, as in HF Mistral
        layers = hf_config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        # NOTE: HF ties lm_head to the embeddings only when the checkpoint has no lm_head of its
        # own (Mistral3Config defaults to tie_word_embeddings=True, yet Mistral-Small-3.1 ships an
        # lm_head); `load_weights` unties when one comes.
        self.config = DecoderConfig.from_hf(
            tc,
            qkv_bias=False,
            o_bias=False,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )
        self.image_token_id = hf_config.image_token_id
        self.vision_tower = PixtralVisionTower(hf_config.vision_config)
        self.vision_tower.resolve_layers(self.feature_layers)  # raises if out of range
        self.multi_modal_projector = self.build_projector(hf_config)
        self.language_model = DecoderModel(self.config)
        self.lm_head = self.build_lm_head(self.config.tie_word_embeddings)

    def build_projector(self, hf_config: PretrainedConfig) -> nn.Module:
        raise NotImplementedError

    def project(self, states: list[torch.Tensor], grids: list[Grid2D]) -> torch.Tensor:
        """Selected hidden states of the tower ([N, D] each) -> [num_image_tokens, hidden]."""
        raise NotImplementedError

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Square images of the tower's image_size (the longest edge its checkpoints' processors
        resize to), or smaller when one would exceed `num_embeds` tokens."""
        p, m = self.vision_tower.patch_size, self.merge_size
        side = self.hf_config.vision_config.image_size // (p * m)  # image tokens per side
        while side > 1 and side * (side + 1) > num_embeds:  # a row: side tokens and a break
            side -= 1
        rows = side * m  # patches per side
        weight = self.embedding
        # NOTE: id 0 stands in for [IMG_BREAK] / [IMG_END]: their embeddings cost the same.
        layout = torch.tensor(image_token_layout(side, side, self.image_token_id, 0, 0))

        def data(_: int) -> dict[str, torch.Tensor]:
            dim = self.vision_tower.patch_conv.in_features  # 3 * p * p
            pixels = torch.randn(rows * rows, dim, device=weight.device, dtype=weight.dtype)
            return {
                "pixel_values": pixels,
                "image_size": torch.tensor([rows * p, rows * p]),
                "token_ids": layout,
            }

        return profile_features(num_embeds, layout.numel(), data)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All images through the tower and projector in one call; one block per image."""
        if not features:
            return []
        p, m = self.vision_tower.patch_size, self.merge_size
        sizes = torch.stack([f.data["image_size"].reshape(2) for f in features]).tolist()
        grids: list[Grid2D] = [(h // p, w // p) for h, w in sizes]
        weight = self.embedding
        pixel_values = torch.cat([f.data["pixel_values"] for f in features])
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        num_patches = sum(r * c for r, c in grids)
        if pixel_values.shape[0] != num_patches:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} patches but image sizes {sizes} "
                f"describe {num_patches}"
            )
        for feature, (rows, cols) in zip(features, grids):
            token_ids = feature.data["token_ids"]  # [num_embeds] CPU
            num_image_tokens = int((token_ids == self.image_token_id).sum())
            expected = (rows // m) * (cols // m)
            if token_ids.numel() != feature.num_embeds or num_image_tokens != expected:
                raise ValueError(
                    f"image {feature.mm_hash!r}: its block of {feature.num_embeds} tokens holds "
                    f"{num_image_tokens} image tokens, but its {rows}x{cols} patch grid yields "
                    f"{expected}"
                )
        states = self.vision_tower(pixel_values, grids, self.feature_layers)
        image_embeds = self.project(states, grids)  # [sum(rows * cols), hidden]
        return self.embed_blocks(features, "token_ids", image_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.lm_head is not None:
            super().load_weights(weights)
            return
        head = self.load_weights_but_head(weights, self)  # tied: decided after the embeddings
        if head is None:
            return
        embed = self.language_model.embed_tokens.weight
        head = head.to(device=embed.device, dtype=embed.dtype)
        if not torch.equal(head, embed):  # an lm_head of its own: untie, as HF does
            self.lm_head = nn.Linear(
                embed.shape[1], embed.shape[0], bias=False, device=embed.device, dtype=embed.dtype
            )
            with torch.no_grad():
                self.lm_head.weight.copy_(head)


class LlavaPixtralForConditionalGeneration(_PixtralVLM):
    """The vlmx model interface for `LlavaForConditionalGeneration` with a Pixtral vision tower
    (HF `LlavaModel` + `LlavaMultiModalProjector`; vision_feature_select_strategy "full")."""

    def build_projector(self, hf_config: PretrainedConfig) -> nn.Module:
        strategy = getattr(hf_config, "vision_feature_select_strategy", "full")
        if strategy != "full":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}: a Pixtral tower has no CLS token "
                "to drop, so Pixtral checkpoints use 'full'; vlmx supports only 'full'"
            )
        dim = hf_config.vision_config.hidden_size * len(self.feature_layers)
        return ProjectorMLP(
            dim,
            text_config(hf_config).hidden_size,
            hf_config.projector_hidden_act,
            bias=hf_config.multimodal_projector_bias,
        )

    def project(self, states: list[torch.Tensor], grids: list[Grid2D]) -> torch.Tensor:
        return self.multi_modal_projector(torch.cat(states, dim=-1))


class Mistral3ForConditionalGeneration(_PixtralVLM):
    """The vlmx model interface for `Mistral3ForConditionalGeneration` (HF `Mistral3Model` +
    `Mistral3MultiModalProjector`)."""

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__(hf_config)
        self.merge_size = hf_config.spatial_merge_size

    def build_projector(self, hf_config: PretrainedConfig) -> nn.Module:
        if len(self.feature_layers) != 1:
            raise ValueError(
                f"vision_feature_layer={hf_config.vision_feature_layer}: Mistral 3's projector "
                "normalises and merges one hidden state; vlmx supports a single int"
            )
        tc = text_config(hf_config)
        return Mistral3Projector(
            hf_config.vision_config.hidden_size,
            tc.hidden_size,
            hf_config.projector_hidden_act,
            hf_config.multimodal_projector_bias,
            hf_config.spatial_merge_size,
            tc.rms_norm_eps,
        )

    def project(self, states: list[torch.Tensor], grids: list[Grid2D]) -> torch.Tensor:
        return self.multi_modal_projector(states[0], grids)
