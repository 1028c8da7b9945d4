"""Attention over a flat varlen batch with a paged KV cache, and varlen attention for vision.

Two backends behind one interface. `torch` (SDPA, any device and dtype) is the reference and
the CPU path that CI runs. The CUDA fast path (bf16 / fp16) is chosen per step by the model
runner, which then attaches a `FastPlan` to the step's metadata:

```
single-query sequences (decode)  -> Triton paged-decode kernel, keys read from the cache
multi-query sequences (prefill)  -> one varlen FlashAttention call over the packed sequences;
                                    keys = this step's own keys when no sequence has cached
                                    context, else gathered from the cache by slot
K/V of the step                  -> Triton KV-store kernel (padding rows, slot -1, skipped)
```

A step of decodes only touches no host data in any layer, so it can be captured in a CUDA
graph. A layer's sliding window goes to both kernels (a torch without FlashAttention windows
runs that layer's prefills on the torch backend). Families with bidirectional image spans
(Gemma 3) keep the torch backend.

KV cache layout, one tensor per layer:

```
kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = keys, 1 = values)
slot = block_id * block_size + offset_in_block
```
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmx.device import host_to_device
from vlmx.ops import paged_attention as triton_ops
from vlmx.ops.varlen import flash_varlen_available, flash_window_available, varlen_flash_attention

Rows = slice | torch.Tensor  # the query rows of a group of sequences: a range, or an index


@dataclass(slots=True)
class DecodePlan:
    """The single-query sequences of a step, laid out for one padded attention call."""

    seqs: list[int]  # sequence indexes in the batch
    row_index: torch.Tensor  # [B] int64, their query rows
    tables: torch.Tensor  # [B, num_blocks] int64, their block tables (-1 clamped to 0)
    mask: torch.Tensor  # [B, 1, 1, max_len] bool, True = a real key
    max_len: int


@dataclass(slots=True)
class FastPlan:
    """One step laid out for the CUDA fast path (see the module docstring)."""

    decode_rows: Rows | None  # rows of the single-query sequences; None = there are none
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int32
    decode_seq_lens: torch.Tensor | None  # [num_decode] int32
    prefill_rows: Rows | None  # rows of the multi-query sequences; None = there are none
    cu_seq_q: torch.Tensor | None = None  # [num_prefill + 1] int32
    cu_seq_k: torch.Tensor | None = None  # [num_prefill + 1] int32
    max_q: int = 0
    max_k: int = 0
    key_slots: torch.Tensor | None = None  # [cu_seq_k[-1]] int64; None = the step's own keys


@dataclass(slots=True)
class AttentionMetadata:
    """One step's flat batch.

    Sequence i owns query rows `query_start_loc[i]:query_start_loc[i+1]`; its keys are the first
    `seq_lens[i]` slots of `block_tables[i]` (the cached context followed by this step's tokens).
    The query rows of a sequence are its last tokens, so query j of a sequence with n queries
    sits at position `seq_lens[i] - n + j` and attends to keys `0 .. seq_lens[i] - n + j`.

    `bidirectional_spans_cpu` (families with `chunk_images = False`, e.g. Gemma 3): per sequence,
    the `(start, end)` token ranges that overlap this step's queries and whose tokens also attend
    to each other forwards (one image's placeholder span each). A query inside a span sees every
    key of its span; the scheduler keeps a span's queries in one step, and its earlier keys are
    in the cache. A layer's `sliding_window` W then keeps only keys with `k > q - W`:

    ```
    keys ->   0 1 2 3 4 5 6        span (2, 5), W = 3          q=3: keys 1..4
    q=3       . x x x x . .        causal OR same-span, AND k > q - W
    ```
    """

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, keys per sequence after this step
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32, -1 = unused
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    query_start_loc_cpu: list[int]  # host copy of query_start_loc
    seq_lens_cpu: list[int]  # host copy of seq_lens
    block_size: int
    bidirectional_spans_cpu: list[list[tuple[int, int]]] | None = None
    # Built by the first layer that needs it, reused by the others (no host work per layer).
    decode_plan: DecodePlan | None = None
    # Set by the model runner when the step runs on the CUDA fast path.
    fast_plan: FastPlan | None = None
    # Cross-attention models (Mllama): the step's sequences with images, their K/V and masks
    # (`vlmx.layers.cross_attention.CrossAttentionMetadata`); None: none in this step.
    cross_attention: object | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's keys/values ([num_tokens, num_kv_heads, head_dim]) into their slots."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slot_mapping] = key
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slot_mapping] = value


def _gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    key = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    value = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    return key, value


def attention_mask(
    num_queries: int,
    seq_len: int,
    spans: list[tuple[int, int]] | None = None,
    sliding_window: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """[num_queries, seq_len] bool mask of one sequence's last `num_queries` queries (True =
    attend): causal, OR inside one of `spans`, AND `k > q - sliding_window`. None = no mask
    (a single causal query with no window)."""
    if num_queries == 1 and sliding_window is None:
        return None  # spans cannot add keys past the last one
    q_pos = torch.arange(seq_len - num_queries, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos  # [num_queries, seq_len]
    for start, end in spans or ():
        mask |= (q_pos >= start) & (q_pos < end) & (k_pos >= start) & (k_pos < end)
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def paged_attention_torch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's queries over its cached keys (reference backend),
    widened by `metadata.bidirectional_spans_cpu` and narrowed by `sliding_window`.

    query: [num_tokens, num_heads, head_dim]; returns the same shape.
    """
    if metadata.bidirectional_spans_cpu is not None or sliding_window is not None:
        return _masked_paged_attention(query, kv_cache, metadata, scale, sliding_window)
    out = torch.empty_like(query)
    starts = metadata.query_start_loc_cpu
    decode = [i for i in range(metadata.num_seqs) if starts[i + 1] - starts[i] == 1]
    if len(decode) > 1:
        _batched_decode(query, kv_cache, metadata, scale, decode, out)
        decode_set = set(decode)
    else:
        decode_set = set()
    for i, seq_len in enumerate(metadata.seq_lens_cpu):
        q_start, q_end = starts[i], starts[i + 1]
        num_queries = q_end - q_start
        if num_queries == 0 or i in decode_set:
            continue
        key, value = _gather_kv(kv_cache, metadata.block_tables[i], seq_len)
        mask = None
        if 1 < num_queries < seq_len:  # a chunk after cached context: causal with an offset
            q_pos = torch.arange(seq_len - num_queries, seq_len, device=query.device)
            k_pos = torch.arange(seq_len, device=query.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # [num_queries, seq_len]
        q = query[q_start:q_end].transpose(0, 1)  # [num_heads, num_queries, head_dim]
        o = F.scaled_dot_product_attention(
            q,
            key.transpose(0, 1),
            value.transpose(0, 1),
            attn_mask=mask,
            is_causal=1 < num_queries == seq_len,
            scale=scale,
            enable_gqa=True,
        )
        out[q_start:q_end] = o.transpose(0, 1)
    return out


def _decode_plan(metadata: AttentionMetadata, seqs: list[int], device: torch.device) -> DecodePlan:
    if metadata.decode_plan is None:
        lens = [metadata.seq_lens_cpu[i] for i in seqs]
        max_len = max(lens)
        num_blocks = -(-max_len // metadata.block_size)
        index = torch.tensor(seqs, device=device)
        lens_t = torch.tensor(lens, device=device)
        metadata.decode_plan = DecodePlan(
            seqs=seqs,
            row_index=torch.tensor([metadata.query_start_loc_cpu[i] for i in seqs], device=device),
            tables=metadata.block_tables[index, :num_blocks].long().clamp_min(0),
            mask=(torch.arange(max_len, device=device)[None, :] < lens_t[:, None])[:, None, None],
            max_len=max_len,
        )
    assert metadata.decode_plan.seqs == seqs
    return metadata.decode_plan


def _batched_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    seqs: list[int],
    out: torch.Tensor,
) -> None:
    """One query per sequence for `seqs`: their keys gathered into one padded batch, one SDPA."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    plan = _decode_plan(metadata, seqs, query.device)
    shape = (len(seqs), plan.tables.shape[1] * block_size, num_kv_heads, head_dim)
    key = kv_cache[0, plan.tables].view(shape)[:, : plan.max_len].transpose(1, 2)  # [B, Hkv, L, D]
    value = kv_cache[1, plan.tables].view(shape)[:, : plan.max_len].transpose(1, 2)
    # NOTE: the query heads that share a KV head become that head's queries ([B, Hkv, G, D]),
    # so no GQA expansion is needed and SDPA's fused masked kernels apply (enable_gqa with a
    # mask falls back to the slow math path on CUDA).
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    q = query[plan.row_index].view(len(seqs), num_kv_heads, group, head_dim)
    o = F.scaled_dot_product_attention(q, key, value, attn_mask=plan.mask, scale=scale)
    out[plan.row_index] = o.reshape(len(seqs), num_heads, head_dim)


def _masked_paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """`paged_attention_torch` with bidirectional spans and / or a sliding window."""
    out = torch.empty_like(query)
    starts = metadata.query_start_loc_cpu
    all_spans = metadata.bidirectional_spans_cpu
    for i, seq_len in enumerate(metadata.seq_lens_cpu):
        q_start, q_end = starts[i], starts[i + 1]
        num_queries = q_end - q_start
        if num_queries == 0:
            continue
        key, value = _gather_kv(kv_cache, metadata.block_tables[i], seq_len)
        spans = all_spans[i] if all_spans is not None else None
        mask = attention_mask(num_queries, seq_len, spans, sliding_window, query.device)
        q = query[q_start:q_end].transpose(0, 1)  # [num_heads, num_queries, head_dim]
        o = F.scaled_dot_product_attention(
            q,
            key.transpose(0, 1),
            value.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[q_start:q_end] = o.transpose(0, 1)
    return out


def fast_path_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the CUDA fast path (varlen FlashAttention + Triton kernels) runs here."""
    return (
        dtype in (torch.bfloat16, torch.float16)
        and flash_varlen_available(device)
        and triton_ops.triton_available(device)
    )


def _rows(indexes: list[int], to_device) -> Rows:
    """A slice when the rows are one contiguous range (a view, no copy), else an index."""
    if indexes[-1] - indexes[0] + 1 == len(indexes):
        return slice(indexes[0], indexes[-1] + 1)
    return to_device(np.asarray(indexes, dtype=np.int64), torch.long)


def build_fast_plan(
    query_start_loc: list[int],
    seq_lens: list[int],
    block_table: np.ndarray,  # [num_seqs, max_blocks] int32 (host)
    block_size: int,
    block_tables: torch.Tensor,  # the same table on the device
    seq_lens_dev: torch.Tensor,  # [num_seqs] int32 on the device
    to_device,  # (np.ndarray, torch.dtype) -> device tensor
) -> FastPlan:
    """Split a step into its decode and prefill sequences and build their device inputs."""
    num_queries = np.diff(np.asarray(query_start_loc))
    decode = np.flatnonzero(num_queries == 1).tolist()
    prefill = np.flatnonzero(num_queries > 1).tolist()
    plan = FastPlan(None, None, None, None)
    if decode and not prefill:
        plan.decode_rows = slice(0, query_start_loc[-1])
        plan.decode_block_tables, plan.decode_seq_lens = block_tables, seq_lens_dev
        return plan
    if decode:
        rows = [query_start_loc[i] for i in decode]
        plan.decode_rows = _rows(rows, to_device)
        plan.decode_block_tables = to_device(block_table[decode], torch.int32)
        plan.decode_seq_lens = to_device(np.asarray(seq_lens)[decode], torch.int32)
    if prefill:
        rows = [r for i in prefill for r in range(query_start_loc[i], query_start_loc[i + 1])]
        plan.prefill_rows = _rows(rows, to_device)
        q_lens = num_queries[prefill]
        k_lens = np.asarray(seq_lens)[prefill]
        plan.cu_seq_q = to_device(np.concatenate(([0], np.cumsum(q_lens))), torch.int32)
        plan.cu_seq_k = to_device(np.concatenate(([0], np.cumsum(k_lens))), torch.int32)
        plan.max_q, plan.max_k = int(q_lens.max()), int(k_lens.max())
        if (k_lens > q_lens).any():  # cached context: read every key back from the cache
            slots = []
            for i, n in zip(prefill, k_lens.tolist()):
                pos = np.arange(n)
                slots.append(block_table[i, pos // block_size].astype(np.int64) * block_size)
                slots[-1] += pos % block_size
            plan.key_slots = to_device(np.concatenate(slots), torch.long)
    return plan


def paged_attention_fast(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], already in the cache
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: FastPlan,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of the step's queries over their sequences' keys (CUDA fast path),
    each query over its last `sliding_window` keys where one is given."""
    window = {"sliding_window": sliding_window}
    if plan.prefill_rows is None:
        return triton_ops.paged_decode_attention(
            query, kv_cache, plan.decode_block_tables, plan.decode_seq_lens, scale, **window
        )
    rows = plan.prefill_rows
    if plan.key_slots is None:
        k, v = key[rows], value[rows]
    else:
        num_kv_heads, head_dim = kv_cache.shape[-2:]
        k = kv_cache[0].view(-1, num_kv_heads, head_dim).index_select(0, plan.key_slots)
        v = kv_cache[1].view(-1, num_kv_heads, head_dim).index_select(0, plan.key_slots)
    o = varlen_flash_attention(
        query[rows],
        k,
        v,
        plan.cu_seq_q,
        plan.cu_seq_k,
        plan.max_q,
        plan.max_k,
        causal=True,
        scale=scale,
        **window,
    )
    if plan.decode_rows is None:
        return o
    out = torch.empty_like(query)
    out[rows] = o
    out[plan.decode_rows] = triton_ops.paged_decode_attention(
        query[plan.decode_rows],
        kv_cache,
        plan.decode_block_tables,
        plan.decode_seq_lens,
        scale,
        **window,
    )
    return out


class PagedAttention(nn.Module):
    """Decoder self-attention: stores this step's K/V in the paged cache, then attends.

    `sliding_window` (None = global): a query at position q sees keys `k > q - sliding_window`
    only (HF `sliding_window_overlay`); the cache still keeps every token.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        plan = metadata.fast_plan
        if plan is not None and (
            self.sliding_window is None or plan.prefill_rows is None or flash_window_available()
        ):
            triton_ops.store_kv(key, value, kv_cache, metadata.slot_mapping)
            return paged_attention_fast(
                query, key, value, kv_cache, plan, self.scale, self.sliding_window
            )
        store_kv(key, value, kv_cache, metadata.slot_mapping)
        return paged_attention_torch(query, kv_cache, metadata, self.scale, self.sliding_window)


def attend_fully_within(model: nn.Module, max_model_len: int) -> None:
    """Drop the sliding windows of `model`'s layers that are at least `max_model_len` long:
    no query can see past them, so those layers attend globally (and take the plain kernels)."""
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    for layer in layers:
        if layer.sliding_window is not None and layer.sliding_window >= max_model_len:
            layer.sliding_window = None


class VarlenSegments:
    """The segments of one `varlen_attention` batch, with the device tensors each backend needs.

    A vision tower builds it once per forward and hands it to every layer: the tensors are made
    (one host-device copy each) on first use and then reused by the layers that follow.
    """

    def __init__(self, cu_seqlens: list[int] | tuple[int, ...]) -> None:
        self.cu_seqlens = tuple(cu_seqlens)  # [0, ..., num_tokens]
        self._flash: tuple[torch.Tensor, int] | None = None
        self._rows: list[tuple[int, int, torch.Tensor]] | None = None

    def flash(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """Boundaries as an int32 [num_segments + 1] tensor on `device`, and the longest
        segment."""
        if self._flash is None:
            cu = host_to_device(list(self.cu_seqlens), device, torch.int32)
            self._flash = cu, int(np.diff(self.cu_seqlens).max(initial=0))
        return self._flash

    def rows(self, device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
        """(length, number of segments, their rows [g * length] on `device`) per length."""
        if self._rows is None:
            starts_by_len: dict[int, list[int]] = {}
            for start, end in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]):
                if end > start:
                    starts_by_len.setdefault(end - start, []).append(start)
            self._rows = [
                (
                    length,
                    len(starts),
                    (torch.tensor(starts)[:, None] + torch.arange(length)).flatten().to(device),
                )
                for length, starts in starts_by_len.items()
            ]
        return self._rows


def varlen_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    segments: VarlenSegments | list[int],  # or the boundaries, [0, ..., num_tokens]
    scale: float | None = None,
) -> torch.Tensor:
    """Full (non-causal) attention inside each segment; segments never see each other.

    Used by vision towers: one segment per image or per attention window. On CUDA in bf16 /
    fp16, one varlen FlashAttention call covers every segment; elsewhere segments of equal
    length run as one batched SDPA call (a tower's windows are mostly of one size). A tower
    passes one `VarlenSegments` to all its layers, so that its device tensors are built once.
    """
    if not isinstance(segments, VarlenSegments):
        segments = VarlenSegments(segments)
    if query.dtype in (torch.bfloat16, torch.float16) and flash_varlen_available(query.device):
        cu, max_len = segments.flash(query.device)
        return varlen_flash_attention(
            query, key, value, cu, cu, max_len, max_len, causal=False, scale=scale
        )
    out = torch.empty_like(query)
    num_heads, head_dim = query.shape[1:]
    for length, num_segments, rows in segments.rows(query.device):
        shape = (num_segments, length, num_heads, head_dim)
        q, k, v = (x[rows].view(shape).transpose(1, 2) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # [g, heads, len, head_dim]
        out[rows] = o.transpose(1, 2).reshape(-1, num_heads, head_dim)
    return out
