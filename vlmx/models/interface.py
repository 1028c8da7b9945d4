"""What the engine expects of a model family: a processor and a model.

A family module (`models/<family>.py`) provides both and is named in `models/registry.py`.

Processor (host side, runs once per request before scheduling):

```python
class Processor:
    shrink_images_hint: str  # how a user makes images cost fewer tokens, quoted in errors
    def __init__(self, model_config: ModelConfig, device: torch.device) -> None: ...
    def process(
        self,
        prompt_token_ids: list[int],      # tokenized prompt, one placeholder token per image
        images: list[torch.Tensor],       # uint8 [3, H, W], RGB, on the CPU
        mm_processor_kwargs: dict,        # per-prompt overrides of the engine-wide kwargs
    ) -> ProcessedPrompt: ...             # expanded ids, one MMFeature per image, positions
```

Model (device side), an `nn.Module` built under the target device and dtype:

```python
class Model(nn.Module):
    def __init__(self, hf_config: PretrainedConfig) -> None: ...
    num_layers: int; num_kv_heads: int; head_dim: int   # KV cache shape
    uses_mrope: bool                                     # positions are [3, T] when True, else [T]
    chunk_images: bool = True   # False: image tokens attend bidirectionally, so an image's span
                                # must be prefilled in one step (the scheduler keeps it whole)
    def embed_tokens(self, input_ids: Tensor) -> Tensor            # [T] -> [T, hidden]
    def encode_images(self, features: list[MMFeature]) -> list[Tensor]
        # one [feature.num_embeds, hidden] tensor per image, all images in one batched call
    def forward(self, inputs_embeds, positions, kv_caches, attn_metadata) -> Tensor  # [T, hidden]
    def compute_logits(self, hidden_states: Tensor) -> Tensor      # [N, hidden] -> [N, vocab]
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None
```
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from vlmx.layers.attention import AttentionMetadata
from vlmx.multimodal.inputs import MMFeature, ProcessedPrompt


class Processor(Protocol):
    shrink_images_hint: str  # e.g. "mm_processor_kwargs={'max_pixels': ...}", for error messages

    def process(
        self,
        prompt_token_ids: list[int],
        images: list[torch.Tensor],
        mm_processor_kwargs: dict,
    ) -> ProcessedPrompt: ...


class Model(Protocol):
    num_layers: int
    num_kv_heads: int
    head_dim: int
    uses_mrope: bool
    chunk_images: bool

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def encode_images(self, features: list[MMFeature]) -> list[torch.Tensor]: ...

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...
