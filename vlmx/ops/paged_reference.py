"""Torch references of the paged-cache kernels in `ops/paged_attention.py`, and the argument
checks both share. Same cache layout: `kv_cache: [2, num_blocks, block_size, num_kv_heads,
head_dim]`, `slot = block_id * block_size + offset_in_block`."""

from __future__ import annotations

import torch

NO_WINDOW = 2**31 - 1  # the decode kernel's window when there is none (int32; seq_len - it < 0)


def store_kv_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference for `store_kv` (torch indexing; syncs with the host on the padding mask)."""
    check_store_args(key, value, kv_cache, slot_mapping)
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = key[valid]
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = value[valid]


def check_kv_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError(
            "kv_cache must be a contiguous [2, num_blocks, block_size, num_kv_heads, head_dim] "
            f"tensor, got shape {tuple(kv_cache.shape)}"
        )


def check_store_args(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    check_kv_cache(kv_cache)
    expected = (slot_mapping.shape[0], *kv_cache.shape[-2:])
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != expected or t.dtype != kv_cache.dtype:
            raise ValueError(
                f"{name} must be {list(expected)} {kv_cache.dtype} (slot_mapping and cache), "
                f"got {list(t.shape)} {t.dtype}"
            )


def paged_decode_attention_torch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Reference for `paged_decode_attention`: a loop over sequences, softmax in float32."""
    check_decode_args(query, kv_cache, block_tables, seq_lens, sliding_window)
    _, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        key = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        value = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        if sliding_window is not None:
            key, value = key[-sliding_window:], value[-sliding_window:]
        key = key.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        value = value.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[i].float(), key) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), value).to(query.dtype)
    return out


def check_decode_args(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
) -> None:
    check_kv_cache(kv_cache)
    if sliding_window is not None and not 0 < sliding_window < NO_WINDOW:
        raise ValueError(f"sliding_window must be a positive int32 or None, got {sliding_window}")
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    if query.dim() != 3 or query.shape[2] != head_dim or query.shape[1] % num_kv_heads:
        raise ValueError(
            f"query must be [batch, num_heads, {head_dim}] with num_heads a multiple of "
            f"{num_kv_heads} KV heads, got {list(query.shape)}"
        )
    if query.dtype != kv_cache.dtype:
        raise ValueError(f"query is {query.dtype} but the cache is {kv_cache.dtype}")
    batch = query.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(
            f"block_tables must be [{batch}, max_blocks] and seq_lens [{batch}], got "
            f"{list(block_tables.shape)} and {list(seq_lens.shape)}"
        )
