"""The worker's store of cross-attention K/V (Mllama): one entry per request that has images,
computed once, on the first step that schedules the request (or resumes it after preemption),
kept through its prefill chunks and decode steps, and dropped when it finishes or is preempted.

```
step 1:  A, B new          -> one vision tower call for the images of both (up to
                              TOWER_BATCH_IMAGES images a call), k/v of every cross layer
                              -> written once into the pool at A's and B's image slots
step 2+: A prefill / decode -> its slots read in place, nothing recomputed or copied
A preempted                 -> its slots freed; A resumed -> computed again
```

The pool is one preallocated tensor `[num_cross_layers, 2, capacity * keys_per_image, kv_heads,
head_dim]`, allocated on first use (its bytes are reserved outside the KV cache by the worker,
`reserved_bytes`); a request holds a run of consecutive image slots (first fit, the pool
compacted when no run is free). The scheduler admits requests only while their images fit
(`Scheduler(max_cross_images=capacity)`).

Prefix-cache hits change nothing here: the entry depends on the request, not on which of its
tokens are computed.

Within a request's slots the keys are ordered so that the common rows read a run of leading
keys with no mask: the own tiles of the images the generated tokens see (the last run of
images, `cross_attention_spans`), then the own tiles of the other images, then the padding
tiles. A step's sequences whose rows all read such a run (every decode) go into one varlen
batch (`CrossBatch`); the others (prefill rows that see some images only) attend with a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vlmx.config import EngineConfig
from vlmx.device import host_to_device
from vlmx.layers.cross_attention import CrossAttentionMetadata, CrossBatch, CrossSequence
from vlmx.models.interface import CrossAttentionModel
from vlmx.models.mllama_processor import cross_attention_spans
from vlmx.step import SchedulerOutput
from vlmx.worker.input_batch import RequestState

CROSS_KV_SHARE = 0.25  # at most this share of the device's memory holds cross K/V (CUDA)
TOWER_BATCH_IMAGES = 8  # images of one vision tower call (more when one request has more)
_CPU_CROSS_KV_BYTES = 1 << 30

ToDevice = Callable[[object, torch.dtype], torch.Tensor]


@dataclass(slots=True)
class CrossEntry:
    slot: int  # its first image slot in the pool; its keys start at slot * keys_per_image
    num_images: int
    starts: np.ndarray  # [I] int64, first position that sees image i
    ends: np.ndarray  # [I] int64, first position that no longer sees it (int64 max: never)
    key_image: torch.Tensor  # [num_keys] int64, the image of each key (in the pool's order)
    key_valid: torch.Tensor  # [num_keys] bool, False on the padding tiles' keys
    num_valid: int  # keys of the images' own tiles, the first ones
    num_tail: int  # keys of the own tiles of the images the last rows see, the first ones
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


def key_order(key_valid: torch.Tensor, key_image: torch.Tensor, tail_images: torch.Tensor):
    """The pool order of a request's keys (`argsort`: position j holds key order[j]): the own
    tiles of `tail_images` ([I] bool), the other own tiles, the padding tiles, each in image,
    tile, patch order."""
    rank = torch.where(key_valid, (~tail_images[key_image]).to(torch.int8), 2)
    return torch.argsort(rank.to(torch.int8), stable=True)


class CrossAttentionStore:
    def __init__(
        self, model: CrossAttentionModel, config: EngineConfig, to_device: ToDevice | None = None
    ) -> None:
        self.model = model
        self.device = config.device
        self.dtype = config.model_config.dtype
        self.bytes_per_image = model.cross_kv_bytes_per_image()
        self.capacity = cross_capacity(config, self.bytes_per_image)
        self.max_images_per_request = config.model_config.max_images_per_prompt or 1
        self.keys_per_image = model.num_cross_keys_per_image
        self.entries: dict[str, CrossEntry] = {}
        self.num_computed = 0  # entries computed so far (tests read it)
        self.num_tower_calls = 0  # vision tower calls so far (tests read it)
        self.pool: torch.Tensor | None = None  # allocated on first use
        device = self.device
        self._to_device = to_device or (lambda a, dtype: host_to_device(a, device, dtype))

    @property
    def num_images(self) -> int:
        return sum(e.num_images for e in self.entries.values())

    @property
    def tower_batch_images(self) -> int:
        return max(TOWER_BATCH_IMAGES, self.max_images_per_request)

    def reserved_bytes(self) -> int:
        return self.capacity * self.bytes_per_image

    def profile(self) -> torch.Tensor:
        """The largest tower call a step makes; returns one request's K/V at the per-prompt
        image limit (the largest one sequence attends over)."""
        features = self.model.profile_cross_features(self.tower_batch_images)
        kv = self.model.cross_attention_kv(features)
        return kv[:, :, : self.max_images_per_request * self.keys_per_image]

    # -- entries --------------------------------------------------------------------------

    def update(self, step: SchedulerOutput, states: list[RequestState]) -> None:
        """Drop the entries of finished and preempted requests; compute those the step's
        requests with images lack, their images batched into few tower calls."""
        for request_id in (*step.finished_request_ids, *step.preempted_request_ids):
            self.entries.pop(request_id, None)
        new = [s for s in states if s.mm_features and s.request_id not in self.entries]
        group: list[RequestState] = []
        for state in new:
            num_images = sum(len(s.mm_features) for s in group) + len(state.mm_features)
            if group and num_images > self.tower_batch_images:
                self._compute(group)
                group = []
            group.append(state)
        if group:
            self._compute(group)
        assert self.num_images <= self.capacity, (self.num_images, self.capacity)

    def _compute(self, group: list[RequestState]) -> None:
        """One tower call for the images of `group`, written to their new entries' slots."""
        features = [f for s in group for f in s.mm_features]
        kv = self.model.cross_attention_kv(features)  # [layers, 2, keys, kv_heads, head_dim]
        self.num_tower_calls += 1
        dest: list[torch.Tensor] = []
        for state in group:
            entry, order = self._entry(state)
            self.entries[state.request_id] = entry
            self.num_computed += 1
            start = entry.slot * self.keys_per_image
            to = torch.empty_like(order)
            to[order] = torch.arange(len(order)) + start  # key order[j] goes to start + j
            dest.append(to)
        pool = self._pool()
        dest_keys = host_to_device(torch.cat(dest), self.device, torch.long)  # [keys]
        pool.index_copy_(2, dest_keys, kv.to(pool.dtype))

    def _entry(self, state: RequestState) -> tuple[CrossEntry, torch.Tensor]:
        """The request's entry and the pool order of its keys (`key_order`)."""
        features = state.mm_features
        spans = cross_attention_spans([f.placeholder.offset for f in features])
        never = np.iinfo(np.int64).max
        starts = [s for s, _ in spans]
        ends = np.array([never if e is None else e for _, e in spans], dtype=np.int64)
        finite_ends = [e for _, e in spans if e is not None]
        key_valid = self.model.cross_key_valid(features)  # [num_keys] bool, CPU
        key_image = torch.arange(len(features)).repeat_interleave(self.keys_per_image)
        tail_images = torch.from_numpy(ends == never)  # [I] bool
        order = key_order(key_valid, key_image, tail_images)
        entry = CrossEntry(
            slot=self._allocate(len(features)),
            num_images=len(features),
            starts=np.array(starts, dtype=np.int64),
            ends=ends,
            key_image=key_image[order].to(self.device),
            key_valid=key_valid[order].to(self.device),
            num_valid=int(key_valid.sum()),
            num_tail=int((key_valid & tail_images[key_image]).sum()),
            last_boundary=max(starts + finite_ends),
        )
        return entry, order

    def _pool(self) -> torch.Tensor:
        if self.pool is None:
            m = self.model
            shape = (
                m.num_cross_layers,
                2,
                self.capacity * self.keys_per_image,
                m.config.num_kv_heads,
                m.config.head_dim,
            )
            self.pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self.pool

    def _allocate(self, num_images: int) -> int:
        """The first slot of a free run of `num_images` slots (first fit; the pool compacted
        when no run is free)."""
        slot = self._first_fit(num_images)
        if slot is None:
            self._compact()
            slot = self._first_fit(num_images)
        assert slot is not None, (num_images, self.num_images, self.capacity)
        return slot

    def _first_fit(self, num_images: int) -> int | None:
        free = 0
        for entry in sorted(self.entries.values(), key=lambda e: e.slot):
            if entry.slot - free >= num_images:
                return free
            free = entry.slot + entry.num_images
        return free if self.capacity - free >= num_images else None

    def _compact(self) -> None:
        """Move the entries to the pool's first slots, in order (a copy of their keys)."""
        pool, n = self._pool(), self.keys_per_image
        free = 0
        for entry in sorted(self.entries.values(), key=lambda e: e.slot):
            if entry.slot != free:
                src = pool[:, :, entry.slot * n : (entry.slot + entry.num_images) * n].clone()
                pool[:, :, free * n : (free + entry.num_images) * n] = src
                entry.slot = free
            free += entry.num_images

    # -- one step ---------------------------------------------------------------------------

    def metadata(
        self, states: list[RequestState], num_scheduled: list[int]
    ) -> CrossAttentionMetadata | None:
        """The step's cross-attention inputs; None when none of its requests has images.

        Each sequence's rows split into runs that see the same images (`_runs`); per sequence,
        its longest run that reads leading keys with no mask joins the varlen batch, the other
        runs (a prefill's rows before and between its images) attend one by one."""
        batched: list[tuple[int, int, int, int, np.ndarray]] = []  # keys at, keys, row, n, seen
        masked: list[tuple[int, int, int, int, torch.Tensor | None, np.ndarray]] = []
        step_row = 0
        for state, n in zip(states, num_scheduled):
            entry = self.entries.get(state.request_id)
            if entry is not None:
                start = state.num_computed_tokens
                runs, has_image = self._runs(entry, start, start + n)
                key_start = entry.slot * self.keys_per_image
                unmasked = [run for run in runs if run[2] is None]
                best = max(unmasked, key=lambda run: run[1], default=None)
                for run in runs:
                    first, length, mask, num_keys = run
                    seen = has_image[first : first + length]
                    if run is best:
                        batched.append((key_start, num_keys, step_row + first, length, seen))
                    else:
                        masked.append((step_row + first, length, key_start, num_keys, mask, seen))
            step_row += n
        if not batched and not masked:
            return None
        batched.sort(key=lambda b: b[0])
        parts = [(b[2], b[3], b[4]) for b in batched] + [(m[0], m[1], m[5]) for m in masked]
        rows = np.concatenate([np.arange(r, r + n) for r, n, _ in parts])  # [R]
        row_mask = np.concatenate([seen for _, _, seen in parts]).astype(np.float32)  # [R]
        seqs, gathered = [], sum(b[3] for b in batched)
        for _, n, key_start, num_keys, mask, _ in masked:
            seqs.append(CrossSequence(gathered, gathered + n, key_start, num_keys, mask))
            gathered += n
        return CrossAttentionMetadata(
            rows=self._to_device(rows, torch.long),  # [R]
            row_mask=self._to_device(row_mask[:, None], torch.float32),  # [R, 1]
            kv=self._pool(),
            batch=self._batch([b[:4] for b in batched]) if batched else None,
            masked=seqs,
        )

    def _batch(self, batched: list[tuple[int, int, int, int]]) -> CrossBatch:
        """The varlen segments of the sequences in `batched` (sorted by their keys' start),
        with a segment of no query over each run of keys between them."""
        cu_q, cu_k = [0], [0]
        for key_start, num_keys, _, n in batched:
            if key_start > cu_k[-1]:  # keys no sequence of the step reads
                cu_q.append(cu_q[-1])
                cu_k.append(key_start)
            assert key_start >= cu_k[-1], "sequences' keys overlap"
            cu_q.append(cu_q[-1] + n)
            cu_k.append(key_start + num_keys)
        return CrossBatch(
            num_rows=cu_q[-1],
            cu_q=cu_q,
            cu_k=cu_k,
        )

    def profile_metadata(self, kv: torch.Tensor, num_tokens: int) -> CrossAttentionMetadata:
        """A profile step's cross-attention: every row over every key of `kv`, masked."""
        mask = torch.ones(1, kv.shape[2], dtype=torch.bool, device=self.device)
        return CrossAttentionMetadata(
            rows=torch.arange(num_tokens, device=self.device),
            row_mask=torch.ones(num_tokens, 1, device=self.device),
            kv=kv,
            batch=None,
            masked=[CrossSequence(0, num_tokens, 0, kv.shape[2], mask)],
        )

    def _runs(
        self, entry: CrossEntry, start: int, end: int
    ) -> tuple[list[tuple[int, int, torch.Tensor | None, int]], np.ndarray]:
        """The runs of the rows of positions start..end-1 that see the same images: (first row,
        rows, their keys' mask [1, num_keys] or None = the leading keys, how many keys), and
        whether each row sees an image, [n] bool.

        A row that sees no image attends to every key (HF zeroes its additive mask)."""
        n = end - start
        if start >= entry.last_boundary and entry.tail is not None:
            (mask, num_keys), seen = entry.tail
            return [(0, n, mask, num_keys)], np.full(n, seen)
        positions = np.arange(start, end)
        visible = (positions[:, None] >= entry.starts) & (positions[:, None] < entry.ends)
        has_image = visible.any(axis=1)  # [n]
        changes = np.flatnonzero((visible[1:] != visible[:-1]).any(axis=1)) + 1
        bounds = [0, *changes.tolist(), n]
        runs = [(a, b - a, *self._row_keys(entry, visible[a])) for a, b in zip(bounds, bounds[1:])]
        if start >= entry.last_boundary:  # every row from here on sees the same images
            entry.tail = (runs[0][2:], bool(has_image[0]))
        return runs, has_image

    def _row_keys(self, entry: CrossEntry, visible: np.ndarray) -> tuple[torch.Tensor | None, int]:
        """The keys of a row that sees `visible` images: (mask [1, keys] or None, key count)."""
        if not visible.any():  # no image visible: every key, padding too (HF)
            return None, entry.num_images * self.keys_per_image
        if visible.all():
            return None, entry.num_valid  # every image's own tiles: the leading keys
        if (visible == (entry.ends == np.iinfo(np.int64).max)).all():
            return None, entry.num_tail  # the last run's own tiles: the leading keys
        vis = host_to_device(visible, self.device, torch.bool)  # [I]
        return (vis[entry.key_image] & entry.key_valid)[
            None
        ], entry.num_images * self.keys_per_image
