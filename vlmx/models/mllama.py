"""Mllama (meta-llama/Llama-3.2-11B-Vision(-Instruct)): a Llama 3 decoder with gated
cross-attention layers to the image states. HF reference:
`transformers.MllamaForConditionalGeneration` (transformers 5.24).

```
pixel_values [I, T, 3, S, S] -> MllamaVisionModel  [I, T, P, Dv * (1 + K)]  (layers/mllama_vision)
  -> multi_modal_projector (Linear)                   [I * T * P, hidden]      the image states
  -> per cross-attention layer: k_norm(k_proj), v_proj  -> the request's cross K/V (once)
text: embed (vocab + 8 rows; <|image|> is a plain token) -> layers: self-attention (paged KV)
  or, at `cross_attention_layers`, CrossAttentionDecoderLayer     layers/cross_attention.py
```

The image tokens take no embeddings from the encoder: `encode_images` gives each `<|image|>`
its token embedding. The images reach the decoder as cross-attention K/V, which the worker
computes once per request (`cross_attention_kv`) and passes each step in
`AttentionMetadata.cross_attention`.

Weight names: the published checkpoints' and transformers 5 `save_pretrained`'s
(`vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.*`), and transformers' module names (`model.vision_model.*`,
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from vlmx.layers.cross_attention import CrossAttentionDecoderLayer
from vlmx.layers.mllama_text import MllamaTextModel
from vlmx.layers.mllama_vision import MllamaVisionModel
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.interface import CrossAttentionModel
from vlmx.models.mllama_processor import MllamaProcessor, supported_aspect_ratios  # noqa: F401
from vlmx.multimodal.inputs import MMFeature

_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "language_model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_model.", "vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
)


class MllamaForConditionalGeneration(VLMBase, CrossAttentionModel):
    """The vlmx model interface for Mllama; see the module docstring.

    Each image's `MMFeature.data`: `pixel_values` [max_num_tiles, 3, S, S], `aspect_ratio_id`
    and `num_tiles` (0-dim int64)."""

    uses_mrope = False
    chunk_images = True  # the <|image|> token is an ordinary token: chunks may end anywhere
    weight_prefixes = _PREFIXES

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        tc, vc = hf_config.text_config, hf_config.vision_config
        self.language_model = MllamaTextModel(tc)
        self.config = self.language_model.cfg
        self.vision_model = MllamaVisionModel(vc)
        if vc.vision_output_dim != self.vision_model.output_dim:
            raise ValueError(
                f"vision_output_dim {vc.vision_output_dim} is not hidden_size * (1 + "
                f"len(intermediate_layers_indices)) = {self.vision_model.output_dim}"
            )
        self.multi_modal_projector = nn.Linear(vc.vision_output_dim, tc.hidden_size)
        self.lm_head = self.build_lm_head(self.config.tie_word_embeddings)
        self.image_token_id = hf_config.image_token_index
        self.num_cross_layers = len(tc.cross_attention_layers)
        self.max_num_tiles = vc.max_num_tiles
        self.tokens_per_tile = self.vision_model.num_patches
        self.tile_size = vc.image_size

    @property
    def cross_layers(self) -> list[CrossAttentionDecoderLayer]:
        return [m for m in self.language_model.layers if isinstance(m, CrossAttentionDecoderLayer)]

    # -- the placeholder rows -----------------------------------------------------------

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """Each `<|image|>` row keeps its token embedding ([1, hidden] per image): the images
        reach the decoder through cross-attention (`cross_attention_kv`)."""
        for feature in features:
            if feature.num_embeds != 1:
                raise ValueError(
                    f"image {feature.mm_hash!r} spans {feature.num_embeds} tokens; Mllama "
                    "images take one <|image|> token each"
                )
        ids = torch.full((len(features),), self.image_token_id, device=self.embedding.device)
        return list(self.embed_tokens(ids).split(1))

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """One placeholder row per image, no pixels: `encode_images` reads none (the tower's
        work is profiled by the worker's cross-attention store, `profile_cross_features`)."""
        return profile_features(num_embeds, 1, lambda _: {})

    def _dummy_image(self, _: int) -> dict[str, torch.Tensor]:
        w = self.multi_modal_projector.weight
        shape = (self.max_num_tiles, 3, self.tile_size, self.tile_size)
        return {
            "pixel_values": torch.randn(shape, device=w.device, dtype=w.dtype),
            "aspect_ratio_id": torch.tensor(len(supported_aspect_ratios(self.max_num_tiles))),
            "num_tiles": torch.tensor(self.max_num_tiles),
        }

    # -- cross-attention ------------------------------------------------------------------

    @property
    def num_cross_keys_per_image(self) -> int:
        return self.max_num_tiles * self.tokens_per_tile

    def cross_kv_bytes_per_image(self) -> int:
        elem = self.multi_modal_projector.weight.element_size()
        return self.num_cross_layers * 2 * self.num_cross_keys_per_image * self.kv_width * elem

    @property
    def kv_width(self) -> int:
        return self.config.num_kv_heads * self.config.head_dim

    def profile_cross_features(self, num_images: int) -> list[MMFeature]:
        return profile_features(num_images, 1, self._dummy_image)

    def cross_key_valid(self, features: list[MMFeature]) -> torch.Tensor:
        """Keys of each image's own tiles (its `num_tiles` of `max_num_tiles`)."""
        num_tiles = torch.tensor([int(f.data["num_tiles"]) for f in features])  # [I]
        tile_of_key = torch.arange(self.num_cross_keys_per_image) // self.tokens_per_tile
        return (tile_of_key[None, :] < num_tiles[:, None]).flatten()  # [I * T * P]

    def cross_attention_kv(self, features: list[MMFeature]) -> torch.Tensor:
        """One request's images -> [num_cross_layers, 2, I * T * P, kv_heads, head_dim], keys in
        image, tile, patch order (HF's cross-attention states)."""
        w = self.multi_modal_projector.weight
        pixels = torch.stack([f.data["pixel_values"] for f in features]).to(w.device, w.dtype)
        ratio_ids = torch.stack([f.data["aspect_ratio_id"] for f in features]).to(w.device)
        num_tiles = torch.stack([f.data["num_tiles"] for f in features]).to(w.device)
        vision = self.vision_model(pixels, ratio_ids, num_tiles)  # [I, T, P, Dv']
        states = self.multi_modal_projector(vision).reshape(-1, self.config.hidden_size)
        return torch.stack([layer.cross_attn.kv(states) for layer in self.cross_layers])
