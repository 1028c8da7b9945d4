"""The CLIP vision tower up to a feature layer (Phi-3.5-vision's `img_processor`).

Matches HF `CLIPVisionModel` read at `hidden_states[feature_layer]` (no post_layernorm):
patch embedding (Conv2d kernel == stride, no bias; done as a matmul over flattened patches),
a learned class embedding before the patches, learned position embeddings, `pre_layrnorm`,
then pre-norm encoder layers (the same as SigLIP's: layer_norm1, q/k/v/out_proj, layer_norm2,
fc1 / fc2 with quick_gelu).

```
crops [N, 3, S, S] -> patches [N, L, 3 p p] -> [N, 1 + L, D] (class first) -> pre_layrnorm
  -> the first `layers_to_run` encoder layers -> drop the class token -> [N, L, D]
```

Parameter names equal HF's below `vision_model.` (q/k/v fused into `self_attn.qkv_proj` by
`load_weights_into`); later layers and `post_layernorm` are not built (`unused_weight`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmx.layers.siglip import patchify
from vlmx.layers.siglip_navit import NaViTEncoder, layers_to_run
from vlmx.layers.vision import PatchProjection


class CLIPEmbeddings(nn.Module):
    """HF `CLIPVisionEmbeddings` without interpolation: patches [N, L, 3 p p] -> [N, 1 + L, D]."""

    def __init__(self, vision_config) -> None:
        super().__init__()
        vc = vision_config
        self.class_embedding = nn.Parameter(torch.zeros(vc.hidden_size))
        self.patch_embedding = PatchProjection(
            vc.num_channels * vc.patch_size**2, vc.hidden_size, bias=False
        )
        num_positions = (vc.image_size // vc.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, vc.hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))  # [N, L, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [N, 1, D]
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)


class CLIPVisionTower(nn.Module):
    """crops [N, 3, S, S] -> patch features [N, (S/p)**2, D] at `feature_layer`."""

    def __init__(self, vision_config, feature_layer: int) -> None:
        super().__init__()
        self.patch_size = vision_config.patch_size
        self.num_layers = layers_to_run(vision_config, feature_layer)
        self.embeddings = CLIPEmbeddings(vision_config)
        self.pre_layrnorm = nn.LayerNorm(
            vision_config.hidden_size, eps=vision_config.layer_norm_eps
        )
        self.encoder = NaViTEncoder(vision_config, self.num_layers)

    def unused_weight(self, name: str) -> bool:
        """Whether a checkpoint name below `vision_model.` is one this tower does not run."""
        if name.startswith("post_layernorm."):
            return True
        if name.startswith("encoder.layers."):
            return int(name.split(".")[2]) >= self.num_layers
        return False

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(patchify(crops, self.patch_size)))
        for layer in self.encoder.layers:
            x = layer(x, None)
        return x[:, 1:]  # [N, L, D]: the patches, the class token dropped
