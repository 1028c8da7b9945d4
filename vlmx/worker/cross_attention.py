"""The worker's store of cross-attention K/V (Mllama): one entry per request that has images,
computed once, on the first step that schedules the request (or resumes it after preemption),
kept through its prefill chunks and decode steps, and dropped when it finishes or is preempted.

```
step 1:  A new (2 images)   -> vision tower + projector + k/v of every cross layer -> store[A]
step 2+: A prefill / decode -> store[A] read, nothing recomputed
A preempted                 -> store[A] dropped; A resumed -> computed again
```

Prefix-cache hits change nothing here: the entry depends on the request, not on which of its
tokens are computed. Capacity is counted in images: the worker reserves `capacity` images'
bytes outside the KV cache (`reserved_bytes`) and the scheduler admits requests only while
their images fit (`Scheduler(max_cross_images=capacity)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmx.config import EngineConfig
from vlmx.device import host_to_device
from vlmx.layers.cross_attention import CrossAttentionMetadata, CrossSequence
from vlmx.models.interface import CrossAttentionModel
from vlmx.models.mllama_processor import cross_attention_spans
from vlmx.step import SchedulerOutput
from vlmx.worker.input_batch import RequestState

CROSS_KV_SHARE = 0.25  # at most this share of the device's memory holds cross K/V (CUDA)
_CPU_CROSS_KV_BYTES = 1 << 30


@dataclass(slots=True)
class CrossEntry:
    kv: torch.Tensor  # [num_cross_layers, 2, num_keys, kv_heads, head_dim]
    num_images: int
    starts: np.ndarray  # [I] int64, first position that sees image i
    ends: np.ndarray  # [I] int64, first position that no longer sees it (int64 max: never)
    key_image: torch.Tensor  # [num_keys] int64, the image of each key (in kv's order)
    key_valid: torch.Tensor  # [num_keys] bool, False on the padding tiles' keys
    num_valid: int  # keys of the images' own tiles, the first ones of `kv`
    last_boundary: int  # from this position on, every row sees the same images
    tail: tuple[tuple[torch.Tensor | None, int], bool] | None = None  # keys past last_boundary


def cross_capacity(config: EngineConfig, bytes_per_image: int) -> int:
    """Images whose cross K/V the worker holds at once: `max_num_seqs` requests at the
    per-prompt image limit (1 when unset), capped by `CROSS_KV_SHARE` of the device (CUDA) or
    1 GiB (CPU), but never below one request's images."""
    per_prompt = config.model_config.max_images_per_prompt or 1
    wanted = config.scheduler_config.max_num_seqs * per_prompt
    if config.device.type == "cuda":
        budget = int(CROSS_KV_SHARE * torch.cuda.mem_get_info(config.device)[1])
    else:
        budget = _CPU_CROSS_KV_BYTES
    return min(wanted, max(per_prompt, budget // max(bytes_per_image, 1)))


class CrossAttentionStore:
    def __init__(self, model: CrossAttentionModel, config: EngineConfig) -> None:
        self.model = model
        self.device = config.device
        self.bytes_per_image = model.cross_kv_bytes_per_image()
        self.capacity = cross_capacity(config, self.bytes_per_image)
        self.max_images_per_request = config.model_config.max_images_per_prompt or 1
        self.entries: dict[str, CrossEntry] = {}
        self.num_computed = 0  # entries computed so far (tests read it)

    @property
    def num_images(self) -> int:
        return sum(e.num_images for e in self.entries.values())

    def reserved_bytes(self) -> int:
        return self.capacity * self.bytes_per_image

    def profile(self) -> torch.Tensor:
        """The largest entry one step computes (one request at the per-prompt image limit)."""
        features = self.model.profile_cross_features(self.max_images_per_request)
        return self.model.cross_attention_kv(features)

    def update(self, step: SchedulerOutput, states: list[RequestState]) -> None:
        """Drop the entries of finished and preempted requests; compute those the step's
        requests with images lack (one request's images per tower call)."""
        for request_id in (*step.finished_request_ids, *step.preempted_request_ids):
            self.entries.pop(request_id, None)
        for state in states:
            if state.mm_features and state.request_id not in self.entries:
                self.entries[state.request_id] = self._entry(state)
                self.num_computed += 1
        assert self.num_images <= self.capacity, (self.num_images, self.capacity)

    def _entry(self, state: RequestState) -> CrossEntry:
        """The request's K/V with the keys of its images' own tiles first (in image order),
        the padding tiles' keys after them: a row that sees every image then attends to a
        prefix of the keys with no mask (attention does not depend on the keys' order)."""
        features = state.mm_features
        spans = cross_attention_spans([f.placeholder.offset for f in features])
        never = np.iinfo(np.int64).max
        starts = [s for s, _ in spans]
        finite_ends = [e for _, e in spans if e is not None]
        per_image = self.model.num_cross_keys_per_image
        key_valid = self.model.cross_key_valid(features)  # [num_keys] bool, CPU
        order = torch.argsort((~key_valid).to(torch.int8), stable=True)  # valid keys first
        key_image = torch.arange(len(features)).repeat_interleave(per_image)[order]
        kv = self.model.cross_attention_kv(features)  # [layers, 2, num_keys, kv_heads, hd]
        kv = kv.index_select(2, order.to(kv.device))
        return CrossEntry(
            kv=kv,
            num_images=len(features),
            starts=np.array(starts, dtype=np.int64),
            ends=np.array([never if e is None else e for _, e in spans], dtype=np.int64),
            key_image=key_image.to(self.device),
            key_valid=key_valid[order].to(self.device),
            num_valid=int(key_valid.sum()),
            last_boundary=max(starts + finite_ends),
        )

    def metadata(
        self, states: list[RequestState], num_scheduled: list[int]
    ) -> CrossAttentionMetadata | None:
        """The step's cross-attention inputs; None when none of its requests has images."""
        rows: list[np.ndarray] = []
        row_masks: list[np.ndarray] = []
        seqs: list[CrossSequence] = []
        step_row = gathered = 0
        for state, n in zip(states, num_scheduled):
            entry = self.entries.get(state.request_id)
            if entry is not None:
                start = state.num_computed_tokens
                keys, has_image = self._keys(entry, start, start + n)
                seqs.append(CrossSequence(gathered, gathered + n, entry.kv, *keys))
                rows.append(np.arange(step_row, step_row + n))
                row_masks.append(has_image)
                gathered += n
            step_row += n
        if not seqs:
            return None
        row_mask = np.concatenate(row_masks).astype(np.float32)[:, None]
        return CrossAttentionMetadata(
            rows=host_to_device(np.concatenate(rows), self.device, torch.long),  # [R]
            row_mask=host_to_device(row_mask, self.device, torch.float32),  # [R, 1]
            seqs=seqs,
        )

    def profile_metadata(self, kv: torch.Tensor, num_tokens: int) -> CrossAttentionMetadata:
        """A profile step's cross-attention: every row over every key of `kv`, masked."""
        mask = torch.ones(num_tokens, kv.shape[2], dtype=torch.bool, device=self.device)
        return CrossAttentionMetadata(
            rows=torch.arange(num_tokens, device=self.device),
            row_mask=torch.ones(num_tokens, 1, device=self.device),
            seqs=[CrossSequence(0, num_tokens, kv, mask, kv.shape[2])],
        )

    def _keys(
        self, entry: CrossEntry, start: int, end: int
    ) -> tuple[tuple[torch.Tensor | None, int], np.ndarray]:
        """((the mask of the keys the rows of positions start..end-1 see: [n, keys], or
        [1, keys] when all rows see the same, None = all of them; how many leading keys they
        attend over), whether each row sees an image, [n] bool).

        A row that sees no image attends to every key (HF zeroes its additive mask)."""
        n = end - start
        if start >= entry.last_boundary and entry.tail is not None:
            return entry.tail[0], np.full(n, entry.tail[1])
        positions = np.arange(start, end)
        visible = (positions[:, None] >= entry.starts) & (positions[:, None] < entry.ends)
        has_image = visible.any(axis=1)  # [n]
        rows = np.unique(visible, axis=0)
        if len(rows) == 1:  # every row sees the same images
            keys = self._row_keys(entry, rows[0])
            if start >= entry.last_boundary:
                entry.tail = (keys, bool(rows[0].any()))
            return keys, has_image
        vis = host_to_device(visible, self.device, torch.bool)  # [n, I]
        mask = vis[:, entry.key_image] & entry.key_valid  # [n, keys]
        mask[~host_to_device(has_image, self.device, torch.bool)] = True
        return (mask, entry.kv.shape[2]), has_image

    def _row_keys(self, entry: CrossEntry, visible: np.ndarray) -> tuple[torch.Tensor | None, int]:
        """The keys of a row that sees `visible` images: (mask [1, keys] or None, key count)."""
        if not visible.any():
            return None, entry.kv.shape[2]  # no image visible: every key, padding too (HF)
        if visible.all():
            return None, entry.num_valid  # every image's own tiles: the leading keys
        vis = host_to_device(visible, self.device, torch.bool)  # [I]
        return (vis[entry.key_image] & entry.key_valid)[None], entry.kv.shape[2]
