"""Idefics3 and SmolVLM: a SigLIP tower, a pixel-shuffle connector, a Llama decoder.

HF reference: `transformers.Idefics3ForConditionalGeneration` and
`transformers.SmolVLMForConditionalGeneration` (transformers 5; the same math and weight names):

```
frames [F, 3, M, M] --SiglipVisionTower (Idefics3VisionTransformer)--> [F, (M/p)**2, D_v]
  --pixel_shuffle(scale_factor) (Idefics3Connector.pixel_shuffle)--> [F, L, D_v * s**2]
  --modality_projection.proj (Idefics3SimpleMLP, no bias)--> [F, L, hidden]
```

L = (M / p)**2 / s**2 = image_seq_len. The decoder is `LlamaModel` (1D RoPE).

Weight names (transformers 5 and the hub checkpoints HuggingFaceM4/Idefics3-8B-Llama3,
HuggingFaceTB/SmolVLM-*-Instruct agree):

```
model.vision_model.*  model.connector.modality_projection.proj.weight  model.text_model.*
lm_head.weight (absent or ignored when tie_word_embeddings)
```
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from vlmx.layers.decoder import DecoderConfig, DecoderModel
from vlmx.layers.pixel_shuffle import pixel_shuffle
from vlmx.layers.siglip import SiglipVisionTower, patchify
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.idefics3_processor import Idefics3Processor, ImageSettings  # noqa: F401
from vlmx.multimodal.inputs import MMFeature

# checkpoint prefix -> module prefix, first match wins
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_model.", "vision_model."),
    ("model.connector.", "connector."),
    ("model.text_model.", "text_model."),
    ("lm_head.", "lm_head."),
)


def vision_position_ids(
    num_rows: int, num_cols: int, num_patches_per_side: int, device: torch.device
) -> torch.Tensor:
    """Position ids of a frame of num_rows x num_cols patches, all valid: [rows * cols] int64.

    Matches HF `Idefics3VisionEmbeddings.forward` (a patch's fractional coordinate bucketed into
    the `num_patches_per_side`-grid of learned positions), computed with the same float32 ops
    on `device`, once per `image_features` call (one frame size).
    """
    boundaries = torch.arange(
        1 / num_patches_per_side, 1.0, 1 / num_patches_per_side, device=device
    )  # [side - 1]
    step_h = 1.0 / torch.tensor([num_rows], device=device)  # [1]
    step_w = 1.0 / torch.tensor([num_cols], device=device)
    coords_h = torch.arange(num_rows, device=device, dtype=torch.float32)[None] * step_h[:, None]
    coords_w = torch.arange(num_cols, device=device, dtype=torch.float32)[None] * step_w[:, None]
    bucket_h = torch.bucketize(coords_h.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [1, R]
    bucket_w = torch.bucketize(coords_w.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [1, C]
    ids = bucket_h[:, :, None] * num_patches_per_side + bucket_w[:, None, :]  # [1, R, C]
    return ids.reshape(-1)


class Idefics3Connector(nn.Module):
    """Matches HF `Idefics3Connector`: [F, side * side, D_v] -> [F, L, hidden]."""

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.scale_factor = hf_config.scale_factor
        self.modality_projection = nn.Module()
        self.modality_projection.proj = nn.Linear(
            hf_config.vision_config.hidden_size * self.scale_factor**2,
            hf_config.text_config.hidden_size,
            bias=False,
        )

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        return self.modality_projection.proj(pixel_shuffle(x, side, side, self.scale_factor))


class Idefics3ForConditionalGeneration(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for Idefics3.

    `encode_images` reads per image `data["pixel_values"]` ([num_frames, 3, M, M], tiles then
    the global view) and `data["layout_ids"]` ([len] int64, the placeholder span's token ids);
    it returns one row per span token: image features at `<image>`, token embeddings elsewhere.
    """

    uses_mrope = False
    chunk_images = True  # causal attention over image tokens: a chunk may end inside one
    decoder_name = "text_model"
    weight_prefixes = _PREFIXES

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.config = DecoderConfig.from_hf(
            hf_config.text_config,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )
        vision = hf_config.vision_config
        self.patch_size = vision.patch_size
        self.tile_size = vision.image_size
        self.num_patches_per_side = vision.image_size // vision.patch_size
        self.tokens_per_frame = self.num_patches_per_side**2 // hf_config.scale_factor**2
        self.image_token_id = hf_config.image_token_id
        self.vision_model = SiglipVisionTower(vision)
        self.connector = Idefics3Connector(hf_config)
        self.text_model = DecoderModel(self.config)
        self.lm_head = self.build_lm_head(self.config.tie_word_embeddings)

    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        """[F, 3, M, M] frames of one size -> [F, L, hidden] (HF `get_image_features`)."""
        num_frames, _, height, width = frames.shape
        rows, cols = height // self.patch_size, width // self.patch_size
        if rows != cols:
            raise ValueError(f"frames must be square, got {height}x{width}")
        patches = patchify(frames, self.patch_size)  # [F, rows * cols, 3 * p * p]
        position_ids = vision_position_ids(rows, cols, self.num_patches_per_side, frames.device)
        cu_seqlens = [i * rows * cols for i in range(num_frames + 1)]
        hidden = self.vision_model(
            patches.flatten(0, 1), cu_seqlens, position_ids.repeat(num_frames)
        )  # [F * rows * cols, D_v]
        return self.connector(hidden.view(num_frames, rows * cols, -1), rows)

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Images of the processor's default grid (longest edge 4 tiles: 4 x 4 tiles and the
        global view), or of fewer tiles when they would exceed `num_embeds`. Their layouts are
        all `<image>` tokens: the tag and newline tokens cost the tower nothing."""
        s = ImageSettings()
        largest = (s.longest_edge // s.max_image_size) ** 2 + 1
        num_frames = min(largest, num_embeds // self.tokens_per_frame)
        num_frames = num_frames if num_frames >= 3 else 1  # a grid of 2+ tiles, or one frame
        weight = self.embedding
        shape = (num_frames, 3, self.tile_size, self.tile_size)
        per_image = num_frames * self.tokens_per_frame

        def data(_: int) -> dict[str, torch.Tensor]:
            return {
                "pixel_values": torch.randn(shape, device=weight.device, dtype=weight.dtype),
                "layout_ids": torch.full((per_image,), self.image_token_id),
            }

        return profile_features(num_embeds, per_image, data)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All images' frames through the tower in one call per frame size (one size unless
        prompts set different max_image_size); one [len(layout), hidden] tensor per image."""
        if not features:
            return []
        weight = self.embedding
        frames = [f.data["pixel_values"].to(weight.device, weight.dtype) for f in features]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            by_size.setdefault(tuple(f.shape[-2:]), []).append(i)
        per_image: list[torch.Tensor] = [None] * len(frames)  # type: ignore[list-item]
        for idxs in by_size.values():
            feats = self.image_features(torch.cat([frames[i] for i in idxs]))  # [F, L, hidden]
            counts = [frames[i].shape[0] for i in idxs]
            for i, chunk in zip(idxs, feats.split(counts)):
                per_image[i] = chunk.flatten(0, 1)  # [frames_i * L, hidden]
        for feature, image_feats in zip(features, per_image):
            layout = feature.data["layout_ids"]  # [len] int64, CPU
            num_image_tokens = int((layout == self.image_token_id).sum())
            if num_image_tokens != image_feats.shape[0] or feature.num_embeds != layout.numel():
                raise ValueError(
                    f"image {feature.mm_hash!r} has {num_image_tokens} <image> tokens in a "
                    f"span of {feature.num_embeds}, but its frames yield {image_feats.shape[0]} "
                    "features"
                )
        return self.embed_blocks(features, "layout_ids", torch.cat(per_image))


class SmolVLMForConditionalGeneration(Idefics3ForConditionalGeneration):
    """SmolVLM: Idefics3's model (HF `SmolVLMForConditionalGeneration` only renames classes)."""
