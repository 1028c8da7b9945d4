"""The torch attention backend against dense attention computed directly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmx.layers.attention import AttentionMetadata, paged_attention_torch, varlen_attention


def _dense_causal(q, k, v, scale):
    """q: [n, H, D] (the last n positions), k/v: [L, Hkv, D] -> [n, H, D]."""
    n, length = q.shape[0], k.shape[0]
    mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return o.transpose(0, 1)


def test_paged_attention_mixes_batched_decodes_and_prefills():
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    seq_lens = [9, 1, 17, 6, 12]  # keys per sequence after this step
    num_queries = [1, 1, 5, 1, 12]  # three decodes (batched together), two prefill chunks
    num_blocks = 32
    kv_cache = torch.randn(2, num_blocks, block, kv_heads, dim)
    perm = torch.randperm(num_blocks).tolist()  # scattered blocks
    tables, keys, values, next_block = [], [], [], 0
    for length in seq_lens:
        n = -(-length // block)
        ids = perm[next_block : next_block + n]
        next_block += n
        tables.append(ids + [-1] * (8 - n))
        keys.append(kv_cache[0, ids].reshape(-1, kv_heads, dim)[:length])
        values.append(kv_cache[1, ids].reshape(-1, kv_heads, dim)[:length])
    starts = [0]
    for n in num_queries:
        starts.append(starts[-1] + n)
    query = torch.randn(starts[-1], heads, dim)
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        block_size=block,
    )
    out = paged_attention_torch(query, kv_cache, metadata, scale=0.3)
    for i in range(len(seq_lens)):
        expected = _dense_causal(query[starts[i] : starts[i + 1]], keys[i], values[i], 0.3)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], expected)


def test_varlen_attention_keeps_segments_apart():
    torch.manual_seed(0)
    cu_seqlens = [0, 5, 10, 13, 13, 20]  # equal-length segments batch together; one empty
    q, k, v = (torch.randn(20, 2, 8) for _ in range(3))
    out = varlen_attention(q, k, v, cu_seqlens, scale=0.5)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end == start:
            continue
        expected = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            k[start:end].transpose(0, 1),
            v[start:end].transpose(0, 1),
            scale=0.5,
        ).transpose(0, 1)
        torch.testing.assert_close(out[start:end], expected)
