"""H2OVL-Mississippi (h2oai/h2ovl-mississippi-800m / -2b), the published `H2OVLChatModel` layout.

The network is InternVL's (`models/internvl.py`): InternViT over 448 px tiles -> drop CLS ->
pixel shuffle 0.5 (ps_version v2) -> LayerNorm + Linear-GELU-Linear (`mlp1`) -> a Llama decoder.
What is H2OVL's own: the config (`h2ovl_config.py`), the processor's MSAC (`h2ovl_processor.py`)
and the published weight names, read without running the folder's code:

```
published -> here (vt = vision_tower, L = encoder.layers.N / encoder.layer.N)
vision_model.embeddings.class_embedding      -> vt.embeddings.cls_token
vision_model.embeddings.patch_embedding.*    -> vt.embeddings.patch_embeddings.projection.*
vision_model.embeddings.position_embedding   -> vt.embeddings.position_embeddings
vision_model.L.attn.qkv.*                    -> vt.L.attention.{q,k,v}_proj.* (split in 3)
vision_model.L.attn.proj.* / attn.{q,k}_norm -> vt.L.attention.projection_layer.* / {q,k}_norm
vision_model.L.ls1 / ls2 / norm1 / norm2     -> vt.L.lambda_1 / lambda_2 / layernorm_before/after
vision_model.L.mlp.fc1.* / mlp.fc2.*         -> vt.L.mlp.fc1.* / mlp.fc2.*
mlp1.0.* / mlp1.1.* / mlp1.3.*    -> multi_modal_projector.{layer_norm,linear_1,linear_2}.*
language_model.model.* / .lm_head.*          -> language_model.* / lm_head.*
```
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from vlmx.models.base import profile_features
from vlmx.models.h2ovl_processor import H2OVLProcessor  # noqa: F401
from vlmx.models.internvl import InternVLForConditionalGeneration
from vlmx.multimodal.inputs import MMFeature

_LAYER_RENAMES = {
    "attn.proj": "attention.projection_layer",
    "attn.q_norm": "attention.q_norm",
    "attn.k_norm": "attention.k_norm",
    "ls1": "lambda_1",
    "ls2": "lambda_2",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
_EMBEDDINGS = {
    "class_embedding": "cls_token",
    "patch_embedding.weight": "patch_embeddings.projection.weight",
    "patch_embedding.bias": "patch_embeddings.projection.bias",
    "position_embedding": "position_embeddings",
}
_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_SCALE = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(ls1|ls2)$")


def published_names(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Published H2OVL tensors -> the names `InternVLForConditionalGeneration` loads (the fused
    attn.qkv split into q/k/v). Names it does not know pass as they are, to be reported."""
    for name, tensor in weights:
        if name.startswith("vision_model.embeddings."):
            rest = name[len("vision_model.embeddings.") :]
            yield "vision_tower.embeddings." + _EMBEDDINGS.get(rest, rest), tensor
        elif m := _LAYER_SCALE.match(name):
            yield f"vision_tower.encoder.layer.{m[1]}.{_LAYER_RENAMES[m[2]]}", tensor
        elif m := _LAYER.match(name):
            prefix = f"vision_tower.encoder.layer.{m[1]}."
            if m[2] == "attn.qkv":
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                    yield f"{prefix}attention.{part}.{m[3]}", chunk
            else:
                yield f"{prefix}{_LAYER_RENAMES.get(m[2], m[2])}.{m[3]}", tensor
        elif name.startswith("mlp1."):
            index, _, param = name[len("mlp1.") :].partition(".")
            yield f"multi_modal_projector.{_PROJECTOR.get(index, index)}.{param}", tensor
        else:
            yield name, tensor


class H2OVLChatModel(InternVLForConditionalGeneration):
    """InternVL's model over H2OVL's published weight names (`vlmx.models.interface.Model`)."""

    def __init__(self, hf_config) -> None:
        tc = hf_config.text_config
        if tc.model_type != "llama":
            raise ValueError(
                f"H2OVL with a {tc.model_type!r} llm_config is not supported by vlmx; the "
                "published Mississippi checkpoints have a 'llama' decoder"
            )
        super().__init__(hf_config)

    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Images of the most tiles the config's settings make (MSAC: both passes' grids and
        the thumbnail, 2 * max_dynamic_patch + 1), or of fewer when they would exceed
        `num_embeds`."""
        c = self.hf_config
        most = c.max_dynamic_patch if c.dynamic_image_size else 1
        largest = 2 * most + 1 if c.use_msac and most >= 3 else most + (most > 1)
        num_tiles = min(largest, num_embeds // self.tokens_per_tile)
        num_tiles = num_tiles if num_tiles >= 3 else 1  # a grid of 2+ tiles, or one tile
        weight = self.multi_modal_projector.linear_1.weight
        shape = (num_tiles, 3, self.tile_size, self.tile_size)

        def data(_: int) -> dict[str, torch.Tensor]:
            pixels = torch.randn(shape, device=weight.device, dtype=weight.dtype)
            return {"pixel_values": pixels}

        return profile_features(num_embeds, num_tiles * self.tokens_per_tile, data)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(published_names(weights))
