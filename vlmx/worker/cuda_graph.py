"""CUDA graphs for decode steps.

A decode step (one new token per sequence) of a 3B decoder launches several hundred small
kernels; launched one by one from Python they cost more host time than the GPU needs to run
them. `DecodeGraphs` records the decoder's forward once per padded batch size and replays it:

```
capture (start-up):   for bs in (256, 224, ..., 2, 1): record forward(ids[:bs], ...) -> hidden[:bs]
replay (each step):   n = 37 sequences -> bs = 48: copy 37 real rows + 11 padding rows into the
                      static inputs, replay graph 48, read hidden[:37]
```

Padding rows write no KV (slot -1, skipped by the KV-store kernel) and attend to nothing
(sequence length 0). The graphs share one memory pool; the static inputs are the only tensors
the host writes between replays. Only steps of the CUDA fast path are captured (every layer's
attention reads device tensors alone).
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from vlmx.layers.attention import AttentionMetadata, FastPlan
from vlmx.worker.staging import StagingBuffer

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes to capture: fine steps for small batches, coarser for large ones."""
    sizes = [1, 2, 4, 8, *range(16, 128, 16), *range(128, 1024 + 1, 32)]
    top = next((s for s in sizes if s >= max_num_seqs), max_num_seqs)
    return [s for s in sizes if s < top] + [top]


def round_up_to_size(sizes: list[int], n: int) -> int:
    """The smallest of the ascending `sizes` that holds `n` (`n` itself past the largest)."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else n


class DecodeGraphs:
    """The decoder's forward for decode steps, captured at padded batch sizes."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        shape = (3, n) if model.uses_mrope else (n,)
        self.positions = torch.zeros(shape, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _metadata(self, bs: int) -> AttentionMetadata:
        plan = FastPlan(
            decode_rows=slice(0, bs),
            decode_block_tables=self.block_tables[:bs],
            decode_seq_lens=self.seq_lens[:bs],
            prefill_rows=None,
        )
        return AttentionMetadata(
            query_start_loc=torch.arange(bs + 1, dtype=torch.int32, device=self.device),
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[1] * bs,
            block_size=self.block_size,
            fast_plan=plan,
        )

    def _forward(self, bs: int, metadata: AttentionMetadata) -> torch.Tensor:
        embeds = self.model.embed_tokens(self.input_ids[:bs])
        return self.model(embeds, self.positions[..., :bs], self.kv_caches, metadata)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # Padding everywhere: no KV written, no key read, while capturing.
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        for bs in reversed(self.sizes):
            metadata = self._metadata(bs)
            self._forward(bs, metadata)  # warm-up: kernel compilation, workspace allocation
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._forward(bs, metadata)
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured decode CUDA graphs for %d batch sizes (up to %d) in %.1f s",
            len(self.sizes),
            self.sizes[-1],
            time.perf_counter() - start,
        )

    def padded_size(self, num_seqs: int) -> int:
        return round_up_to_size(self.sizes, num_seqs)

    def run(
        self,
        staging: StagingBuffer,
        input_ids: list[int],
        positions: np.ndarray,  # [num_seqs] or [3, num_seqs]
        slots: np.ndarray,  # [num_seqs]
        block_table: np.ndarray,  # [num_seqs, width] int32
        seq_lens: list[int],
        patch: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Replay the graph for `len(input_ids)` sequences; returns their hidden states.

        `patch`: (rows, token ids) already on the device that replace those rows' input ids
        (samples of a step not read by the host yet)."""
        n = len(input_ids)
        bs = self.padded_size(n)
        pad = bs - n
        copies = (
            (self.input_ids[:bs], np.pad(np.asarray(input_ids), (0, pad)), torch.long),
            (self.positions[..., :bs], _pad_last(positions, pad, 0), torch.long),
            (self.slot_mapping[:bs], _pad_last(slots, pad, -1), torch.long),
            (self.seq_lens[:bs], np.pad(np.asarray(seq_lens), (0, pad)), torch.int32),
            (self.block_tables[:n, : block_table.shape[1]], block_table, torch.int32),
        )
        for dst, array, dtype in copies:
            dst.copy_(staging.stage(array, dtype), non_blocking=True)
        if patch is not None:
            self.input_ids.index_copy_(0, *patch)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]


def _pad_last(array: np.ndarray, pad: int, value: int) -> np.ndarray:
    widths = [(0, 0)] * (array.ndim - 1) + [(0, pad)]
    return np.pad(array, widths, constant_values=value)
