"""LLaVA-OneVision (e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf).

SigLIP over S x S tiles -> hidden state of `vision_feature_layer` (before post_layernorm) ->
Linear-GELU-Linear projector -> AnyRes packing with `image_newline` -> a Qwen2 decoder with
plain 1D RoPE. HF reference: `transformers.LlavaOnevisionForConditionalGeneration` (5.24).

```
pixel_values [T, 3, S, S]  (T tiles of all images of the step; per image its base first)
  -> patchify, SiglipVisionTower(feature_layers)     [T * side**2, Dv * L]   layers/siglip.py
  -> (strategy "default": drop each tile's first)    [T, side**2 (- 1), Dv * L]
  -> ProjectorMLP                                    [T, side**2, hidden]    layers/projector.py
  -> per image: one tile: its features + newline     [side**2 + 1, hidden]
                else: base, then the tiles packed    [side**2 + oh * (ow + 1), hidden]
                      (layers/anyres.py)
```

Weight names accepted (both map onto this module's `vision_tower.*`, `multi_modal_projector.*`,
`image_newline`, `language_model.*`, `lm_head.*`):

```
published / transformers 5 save_pretrained:  vision_tower.vision_model.*  multi_modal_projector.*
                                             image_newline  language_model.model.*
                                             language_model.lm_head.*
transformers 4.52+ module names:             model.vision_tower.vision_model.*  model.image_newline
                                             model.multi_modal_projector.*
                                             model.language_model.*  lm_head.*
transformers 5 module names (state_dict()):  as 4.52+, with model.vision_tower.* (no vision_model)
```
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from vlmx.layers.anyres import anyres_layout, max_tiles_of, pack_anyres_features
from vlmx.layers.decoder import DecoderConfig, DecoderModel
from vlmx.layers.projector import ProjectorMLP
from vlmx.layers.siglip import SiglipVisionTower, patchify
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.llava_onevision_processor import LlavaOnevisionProcessor  # noqa: F401
from vlmx.models.loader import text_config
from vlmx.multimodal.inputs import MMFeature

# checkpoint prefix -> module prefix, first match wins
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "language_model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),  # transformers 5 module names
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("vision_tower.vision_model.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("image_newline", "image_newline"),
    ("lm_head.", "lm_head."),
)
_TEXT_MODEL_TYPES = ("qwen2", "llama")
_STRATEGIES = ("full", "default")


class LlavaOnevisionForConditionalGeneration(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for LLaVA-OneVision.

    `encode_images` reads per image `data["pixel_values"]` ([num_tiles, 3, S, S]: one tile, or
    the base and then the canvas's tiles row-major) and `data["image_size"]` ([2] int64 (H, W)
    of the image, on the CPU). `forward` takes positions [T] int64.
    """

    uses_mrope = False
    chunk_images = True  # causal attention over image tokens: a chunk may end inside one
    weight_prefixes = _PREFIXES

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        tc = text_config(hf_config)
        if tc.model_type not in _TEXT_MODEL_TYPES:
            raise ValueError(
                f"LLaVA-OneVision with a {tc.model_type!r} language model is not supported by "
                f"vlmx; supported: {', '.join(_TEXT_MODEL_TYPES)}"
            )
        qwen2 = tc.model_type == "qwen2"
        self.config = DecoderConfig.from_hf(
            tc,
            qkv_bias=True if qwen2 else None,  # Qwen2: q/k/v bias, no o bias
            o_bias=False if qwen2 else None,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        )
        vc = hf_config.vision_config
        if vc.model_type != "siglip_vision_model" or getattr(vc, "vision_use_head", False):
            raise ValueError(
                f"a {vc.model_type!r} vision tower (vision_use_head="
                f"{getattr(vc, 'vision_use_head', None)}) is not supported; LLaVA-OneVision "
                "in vlmx takes a SigLIP tower without head"
            )
        self.strategy = hf_config.vision_feature_select_strategy
        if self.strategy not in _STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy {self.strategy!r} is not supported; "
                f"supported: {', '.join(_STRATEGIES)}"
            )
        layers = hf_config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.tile_size = vc.image_size
        self.side = vc.image_size // vc.patch_size  # features per tile side
        self.pinpoints = [(int(h), int(w)) for h, w in hf_config.image_grid_pinpoints]
        if any(h % self.tile_size or w % self.tile_size for h, w in self.pinpoints):
            raise ValueError(
                f"image_grid_pinpoints {self.pinpoints} must be multiples of the tile size "
                f"{self.tile_size}"
            )
        self.max_tiles = max_tiles_of(hf_config.vision_aspect_ratio)

        self.vision_tower = SiglipVisionTower(vc)
        self.vision_tower.resolve_feature_layers(self.feature_layers)  # checks the range
        self.multi_modal_projector = ProjectorMLP(
            vc.hidden_size * len(self.feature_layers),
            self.config.hidden_size,
            hf_config.projector_hidden_act,
            bias=hf_config.multimodal_projector_bias,
        )
        self.image_newline = nn.Parameter(torch.empty(self.config.hidden_size))
        self.language_model = DecoderModel(self.config)
        self.lm_head = self.build_lm_head(self.config.tie_word_embeddings)

    def num_embeds_of(self, num_tiles: int, height: int, width: int) -> int:
        """Embeddings of an image of (height, width) pixels encoded as `num_tiles` tiles."""
        tokens = self.side**2 - (1 if self.strategy == "default" else 0)
        if num_tiles == 1:
            return tokens + 1
        layout = anyres_layout(
            height, width, self.pinpoints, self.tile_size, self.side, self.max_tiles
        )
        if layout.num_tiles + 1 != num_tiles:
            raise ValueError(
                f"an image of {height}x{width} pixels has {num_tiles} tiles but its AnyRes grid "
                f"needs {layout.num_tiles} + the base"
            )
        return tokens + layout.num_grid_features

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Images the size of the largest canvas (all its tiles and the base, as a prompt's only
        image), or single-tile images (as in several-image prompts) when one would exceed
        `num_embeds`."""
        height, width = max(self.pinpoints, key=lambda p: p[0] * p[1])
        num_tiles = (height // self.tile_size) * (width // self.tile_size) + 1
        per_image = self.num_embeds_of(num_tiles, height, width)
        if per_image > num_embeds:
            num_tiles, per_image = 1, self.num_embeds_of(1, height, width)
        weight = self.multi_modal_projector.linear_1.weight
        shape = (num_tiles, 3, self.tile_size, self.tile_size)

        def data(_: int) -> dict[str, torch.Tensor]:
            pixels = torch.randn(shape, device=weight.device, dtype=weight.dtype)
            return {"pixel_values": pixels, "image_size": torch.tensor([height, width])}

        return profile_features(num_embeds, per_image, data)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All tiles of all images through the tower in one call; one [num_embeds_i, hidden] each.

        Matches HF `LlavaOnevisionModel.get_image_features` (with `pack_image_features`).
        """
        if not features:
            return []
        weight = self.multi_modal_projector.linear_1.weight
        tiles = [f.data["pixel_values"] for f in features]
        sizes = torch.stack([f.data["image_size"].reshape(2) for f in features]).tolist()
        for feature, t, (height, width) in zip(features, tiles, sizes):
            expected = self.num_embeds_of(t.shape[0], height, width)
            if feature.num_embeds != expected:
                raise ValueError(
                    f"image {feature.mm_hash!r} has {feature.num_embeds} placeholder tokens but "
                    f"its tiles yield {expected} embeddings"
                )
        pixel_values = torch.cat(tiles).to(device=weight.device, dtype=weight.dtype)
        num_tiles, tokens = pixel_values.shape[0], self.side**2
        patches = patchify(pixel_values, self.vision_tower.patch_size).flatten(0, 1)
        cu_seqlens = [i * tokens for i in range(num_tiles + 1)]
        x = self.vision_tower(patches, cu_seqlens, feature_layers=self.feature_layers)
        x = x.view(num_tiles, tokens, -1)  # [T, side**2, Dv * L]
        if self.strategy == "default":
            x = x[:, 1:]
        x = self.multi_modal_projector(x)  # [T, side**2 (- 1), hidden]
        out = []
        for per_image, (height, width) in zip(x.split([t.shape[0] for t in tiles]), sizes):
            newline = self.image_newline.to(per_image.dtype)
            if per_image.shape[0] == 1:
                out.append(torch.cat([per_image[0], newline[None]]))
                continue
            layout = anyres_layout(
                height, width, self.pinpoints, self.tile_size, self.side, self.max_tiles
            )
            grid = pack_anyres_features(per_image[1:], layout, newline)
            out.append(torch.cat([per_image[0], grid]))  # [side**2 + oh * (ow + 1), hidden]
        return out
