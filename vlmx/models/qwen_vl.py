"""Qwen-VL / Qwen-VL-Chat (Qwen/Qwen-VL-Chat), the published layout (`QWenLMHeadModel`,
model_type "qwen"; the folder's code never runs: `qwen_vl_config.py` reads its config and
tokenizer).

```
pixel_values [B, 3, 448, 448] -> QwenVLVisionTower (ViT-bigG + 256-query resampler)
  -> [B, 256, hidden]: the embeddings of the 256 tokens between each <img> and </img>
  -> the Qwen-1 decoder (MHA, RoPE, RMSNorm, fused qkv with bias, SwiGLU MLP)
```

The Qwen-1 decoder is a Qwen2 decoder under other names; the published weights map onto it:

```
transformer.wte.weight                 -> language_model.embed_tokens.weight
transformer.h.{i}.ln_1 / ln_2          -> layers.{i}.input_layernorm / post_attention_layernorm
transformer.h.{i}.attn.c_attn.{w, b}   -> self_attn.q_proj / k_proj / v_proj ([q; k; v] rows)
transformer.h.{i}.attn.c_proj.weight   -> self_attn.o_proj.weight
transformer.h.{i}.mlp.w2 / w1 / c_proj -> mlp.gate_proj / up_proj / down_proj
    (Qwen-1: c_proj(w1(x) * silu(w2(x))): w2 is the gate)
transformer.ln_f.weight                -> language_model.norm.weight
transformer.visual.*                   -> visual.*   (layers/qwen_vl_vision.py names)
lm_head.weight
```
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from transformers import PretrainedConfig

from vlmx.layers.decoder import DecoderConfig, DecoderModel
from vlmx.layers.qwen_vl_vision import QwenVLVisionTower
from vlmx.models.base import VLMBase, profile_features
from vlmx.models.qwen_vl_processor import QwenVLProcessor  # noqa: F401
from vlmx.multimodal.inputs import MMFeature

# published decoder names (below transformer.h.{i}.) -> Qwen2's
_LAYER_NAMES = (
    ("ln_1.", "input_layernorm."),
    ("ln_2.", "post_attention_layernorm."),
    ("attn.c_proj.", "self_attn.o_proj."),
    ("mlp.w1.", "mlp.up_proj."),
    ("mlp.w2.", "mlp.gate_proj."),
    ("mlp.c_proj.", "mlp.down_proj."),
)


def published_to_qwen2(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Published Qwen-1 decoder names -> transformers Qwen2 names (`model.*`, c_attn split
    into q/k/v); `transformer.visual.*` and `lm_head.*` pass as they are."""
    for name, tensor in weights:
        if name.startswith("transformer.visual.") or not name.startswith("transformer."):
            yield name, tensor
        elif name.startswith("transformer.wte."):
            yield "model.embed_tokens." + name[len("transformer.wte.") :], tensor
        elif name.startswith("transformer.ln_f."):
            yield "model.norm." + name[len("transformer.ln_f.") :], tensor
        elif name.startswith("transformer.h."):
            index, _, rest = name[len("transformer.h.") :].partition(".")
            layer = f"model.layers.{index}."
            if rest.startswith("attn.c_attn."):
                suffix = rest[len("attn.c_attn.") :]
                for part, chunk in zip(("q", "k", "v"), tensor.chunk(3, dim=0)):
                    yield f"{layer}self_attn.{part}_proj.{suffix}", chunk
                continue
            for published, ours in _LAYER_NAMES:
                if rest.startswith(published):
                    rest = ours + rest[len(published) :]
                    break
            yield layer + rest, tensor
        else:
            yield name, tensor  # unknown: reported as unexpected


class QwenVLForConditionalGeneration(VLMBase):
    """The vlmx model interface (`vlmx.models.interface.Model`) for Qwen-VL.

    `encode_images` reads per image `data["pixel_values"]` [3, S, S]. Positions [T].
    """

    uses_mrope = False
    chunk_images = True  # causal attention over image tokens
    weight_prefixes = (
        ("transformer.visual.", "visual."),
        ("model.", "language_model."),
        ("lm_head.", "lm_head."),
    )

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.config = DecoderConfig.from_hf(hf_config, qkv_bias=True, o_bias=False)
        self.visual_config = hf_config.visual
        if self.visual_config["output_dim"] != self.config.hidden_size:
            raise ValueError(
                f"visual output_dim {self.visual_config['output_dim']} != hidden_size "
                f"{self.config.hidden_size}"
            )
        self.image_size = self.visual_config["image_size"]
        self.num_queries = self.visual_config["n_queries"]
        self.visual = QwenVLVisionTower(self.visual_config)
        self.language_model = DecoderModel(self.config)
        self.lm_head = self.build_lm_head(self.config.tie_word_embeddings)

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Images at the tower's one size, n_queries (256) embeddings each."""
        weight = self.visual.proj
        shape = (3, self.image_size, self.image_size)

        def data(_: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": torch.randn(shape, device=weight.device, dtype=weight.dtype)}

        return profile_features(num_embeds, self.num_queries, data)

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]:
        """All images through the tower in one call; one [n_queries, hidden] each."""
        if not features:
            return []
        for f in features:
            if f.num_embeds != self.num_queries:
                raise ValueError(
                    f"image {f.mm_hash!r} has {f.num_embeds} placeholder tokens; Qwen-VL "
                    f"yields {self.num_queries} per image"
                )
        weight = self.visual.proj
        pixels = torch.stack([f.data["pixel_values"] for f in features])  # [B, 3, S, S]
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values of {tuple(pixels.shape[-2:])} pixels; the tower takes "
                f"{self.image_size}x{self.image_size}"
            )
        embeds = self.visual(pixels.to(device=weight.device, dtype=weight.dtype))
        return list(embeds.unbind(0))  # [n_queries, hidden] each

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(published_to_qwen2(weights))
