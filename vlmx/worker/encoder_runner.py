"""The vision encoder's part of a step: encode each new image once, keep its embeddings until
the scheduler's encoder cache evicts them, and copy them into the rows of their placeholders.

```
step rows:      [ t t <vs> P P P | P P P <ve> t ]     two chunks of one image's span
encoder rows:          0 1 2       3 4 5               outputs[mm_hash][lo:hi] per chunk
```
The scheduler decides what is encoded when and what is dropped (`SchedulerOutput.encoder_inputs`,
`freed_mm_hashes`); this keeps the tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from vlmx.models.interface import Model
from vlmx.multimodal.inputs import MMFeature
from vlmx.step import SchedulerOutput
from vlmx.worker.input_batch import RequestState


class EncoderRunner:
    def __init__(
        self, model: Model, to_device: Callable[[np.ndarray | list, torch.dtype], torch.Tensor]
    ) -> None:
        self.model = model
        self.to_device = to_device
        self.outputs: dict[str, torch.Tensor] = {}  # mm_hash -> [num_embeds, hidden]

    def clear(self) -> None:
        self.outputs.clear()

    def run(
        self,
        step: SchedulerOutput,
        requests: dict[str, RequestState],
        tower_lora: Callable[[RequestState], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        """Drop the evicted outputs, then encode the step's new images in one batched call
        (with `tower_lora`, one call per adapter on the tower: `tower_lora(state)` is the
        context that applies the state's adapter, None where it has none)."""
        for mm_hash in step.freed_mm_hashes:
            self.outputs.pop(mm_hash, None)
        groups: dict[int, tuple[RequestState, list[MMFeature]]] = {}
        seen: set[str] = set()
        for request_id, indexes in step.encoder_inputs.items():
            state = requests[request_id]
            for idx in indexes:
                feature = state.mm_features[idx]
                if feature.mm_hash not in self.outputs and feature.mm_hash not in seen:
                    seen.add(feature.mm_hash)
                    lora_id = (
                        state.lora_request.lora_int_id if tower_lora and state.lora_request else 0
                    )
                    groups.setdefault(lora_id, (state, []))[1].append(feature)
        for state, features in groups.values():
            context = tower_lora(state) if tower_lora else None
            with context or contextlib.nullcontext():
                embeds_list = self.model.encode_images(features)
            for feature, embeds in zip(features, embeds_list, strict=True):
                assert embeds.shape[0] == feature.num_embeds, (embeds.shape, feature.num_embeds)
                self.outputs[feature.mm_hash] = embeds

    def merge(
        self, inputs_embeds: torch.Tensor, states: list[RequestState], num_scheduled: list[int]
    ) -> None:
        """Copy encoder rows into the rows of this step's placeholder tokens (in place)."""
        rows, chunks = [], []
        row = 0
        for state, n in zip(states, num_scheduled):
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            if start < state.mm_end:
                for feature in state.mm_features:
                    p = feature.placeholder
                    if p.offset >= end:
                        break
                    if p.end <= start:
                        continue
                    lo, hi = max(start, p.offset), min(end, p.end)
                    chunks.append(self.outputs[feature.mm_hash][lo - p.offset : hi - p.offset])
                    rows.append(torch.arange(row + lo - start, row + hi - start))
            row += n
        if chunks:
            index = self.to_device(torch.cat(rows), torch.long)  # [num image rows]
            inputs_embeds.index_copy_(0, index, torch.cat(chunks).to(inputs_embeds.dtype))

    def profile(self, num_embeds: int) -> list[torch.Tensor]:
        """The encoder's largest step: images worth `num_embeds` embeddings (the scheduler's
        per-step encoder budget) through the tower at once. Returns their embeddings, which
        the caller holds through a decoder step, as a real step does."""
        return self.model.encode_images(self.model.profile_image_features(num_embeds))
