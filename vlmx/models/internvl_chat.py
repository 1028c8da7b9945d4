"""InternVL in its published layout (`InternVLChatModel`, model_type "internvl_chat", e.g.
OpenGVLab/InternVL2-2B): the model of `internvl.py` under the published weight names.

Config: `internvl_chat_config.read_published_config`. Weights, renamed to the names of the
transformers-native layout (the public mapping of transformers' convert_internvl_weights_to_hf):

```
vision_model.embeddings.{class_embedding, position_embedding, patch_embedding}
    -> vision_tower.embeddings.{cls_token, position_embeddings, patch_embeddings.projection}
vision_model.encoder.layers.i.{norm1, norm2, ls1, ls2, attn.proj, attn.q_norm, attn.k_norm, mlp}
    -> vision_tower.encoder.layer.i.{layernorm_before, layernorm_after, lambda_1, lambda_2,
       attention.projection_layer, attention.q_norm, attention.k_norm, mlp}
vision_model.encoder.layers.i.attn.qkv [3 * Dv, Dv]  -> attention.{q,k,v}_proj (thirds)
mlp1.{0, 1, 3}  -> multi_modal_projector.{layer_norm, linear_1, linear_2}
InternLM2 (language_model.*):
  model.tok_embeddings -> model.embed_tokens        output -> lm_head
  layers.i.attention.wo -> self_attn.o_proj
  layers.i.feed_forward.{w1, w3, w2} -> mlp.{gate, up, down}_proj
  layers.i.{attention_norm, ffn_norm} -> {input_layernorm, post_attention_layernorm}
  layers.i.attention.wqkv [kv_heads * (q_per_kv + 2) * head_dim, hidden], per KV group its
      q_per_kv query heads, then its key head, then its value head -> self_attn.{q,k,v}_proj
Qwen2 / Llama (language_model.model.*, language_model.lm_head.*): as they are.
```
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from vlmx.models.internvl import InternVLForConditionalGeneration
from vlmx.models.internvl_processor import InternVLProcessor
from vlmx.models.loader import text_config

_VISION_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^vision_model\.", "vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"\.class_embedding$", ".cls_token"),
    (r"\.position_embedding$", ".position_embeddings"),
    (r"\.patch_embedding\.", ".patch_embeddings.projection."),
    (r"\.ls(\d+)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
)
_INTERNLM2_RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.tok_embeddings\.", ".embed_tokens."),
    (r"^language_model\.output\.", "language_model.lm_head."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PROJECTOR = {
    "mlp1.0.": "multi_modal_projector.layer_norm.",
    "mlp1.1.": "multi_modal_projector.linear_1.",
    "mlp1.3.": "multi_modal_projector.linear_2.",
}


def _apply(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


class InternVLChatModel(InternVLForConditionalGeneration):
    """`InternVLForConditionalGeneration` loading the published `InternVLChatModel` weights."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.published_to_native(weights))

    def published_to_native(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Published (name, tensor) -> transformers-native ones, packed q/k/v split."""
        internlm2 = getattr(self.hf_config, "llm_architecture", None) == "InternLM2ForCausalLM"
        tc = text_config(self.hf_config)
        for name, tensor in weights:
            if name.startswith("vision_model."):
                name = _apply(name, _VISION_RENAMES)
                if ".attention.qkv." in name:
                    for part, rows in zip("qkv", tensor.chunk(3, dim=0)):
                        yield name.replace(".qkv.", f".{part}_proj."), rows
                    continue
            elif name.startswith("mlp1."):
                prefix = name[: len("mlp1.0.")]
                if prefix not in _PROJECTOR:
                    raise ValueError(f"unexpected projector weight {name!r} in the checkpoint")
                name = _PROJECTOR[prefix] + name[len(prefix) :]
            elif internlm2 and name.startswith("language_model."):
                name = _apply(name, _INTERNLM2_RENAMES)
                if ".attention.wqkv." in name:
                    yield from _split_wqkv(name, tensor, tc)
                    continue
            yield name, tensor


def _split_wqkv(name: str, wqkv: torch.Tensor, tc) -> Iterator[tuple[str, torch.Tensor]]:
    """InternLM2's packed [kv_heads * (q_per_kv + 2) * head_dim, hidden] -> q, k, v rows."""
    kv_heads = tc.num_key_value_heads
    q_per_kv = tc.num_attention_heads // kv_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    if wqkv.shape[0] != kv_heads * (q_per_kv + 2) * head_dim:
        raise ValueError(
            f"weight {name!r} has {wqkv.shape[0]} rows, expected {kv_heads} KV groups of "
            f"({q_per_kv} + 2) heads of {head_dim}"
        )
    groups = wqkv.reshape(kv_heads, q_per_kv + 2, head_dim, *wqkv.shape[1:])
    base = name.replace(".attention.wqkv.", ".self_attn.{}_proj.")
    yield base.format("q"), groups[:, :q_per_kv].reshape(-1, *wqkv.shape[1:])
    yield base.format("k"), groups[:, -2].reshape(-1, *wqkv.shape[1:])
    yield base.format("v"), groups[:, -1].reshape(-1, *wqkv.shape[1:])


class InternVLChatProcessor(InternVLProcessor):
    """The published processor: `<image>` in the prompt text becomes `<img>` + `<IMG_CONTEXT>`
    x (256 per tile) + `</img>`; tiles of `force_image_size` px, `min_dynamic_patch` to
    `max_dynamic_patch` of them (config.json) plus a thumbnail, the ImageNet mean/std of
    preprocessor_config.json (whose CLIP-style `size` / `crop_size` only name the tile size)."""

    placeholder_token = "<image>"
    placeholder_hint = "as vLLM's example writes them (Image-1: <image>\\n...)"

    def configure(self, image_config: dict, processor: dict) -> None:
        cfg = self.hf_config
        vision = cfg.vision_config
        size = (
            vision.image_size[0]
            if isinstance(vision.image_size, list | tuple)
            else vision.image_size
        )
        raw = {
            "size": {"height": size, "width": size},
            "min_patches": getattr(cfg, "min_dynamic_patch", 1),
            "max_patches": getattr(cfg, "max_dynamic_patch", 12),
            "image_mean": image_config.get("image_mean", IMAGENET_MEAN),
            "image_std": image_config.get("image_std", IMAGENET_STD),
            "resample": image_config.get("resample"),
            "do_normalize": image_config.get("do_normalize"),
        }
        super().configure(raw, {})

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Prompt text -> ids, each `<image>` one <IMG_CONTEXT> (expanded later); the text is
        tokenized in one piece, as the published code tokenizes its expanded prompt (the
        image tokens are added tokens: the text between them is cut the same either way)."""
        context = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        return self.tokenizer.encode(
            text.replace("<image>", context), add_special_tokens=add_special_tokens
        )
