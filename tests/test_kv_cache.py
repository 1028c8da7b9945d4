"""BlockPool and KVCacheManager: allocation, reference counts, LRU eviction, prefix hits keyed by
tokens + image hashes + LoRA. Every test ends with the cache's own integrity check."""

from __future__ import annotations

import numpy as np

from tests.engine_helpers import PLACEHOLDER_ID, Image, make_request, text
from vlmx.engine.kv_cache import BlockPool, KVCacheManager, update_block_hashes
from vlmx.worker.input_batch import BlockTable

BLOCK_SIZE = 4


def snapshot(kv: KVCacheManager) -> tuple:
    """Everything allocate_slots may change."""
    return (
        list(kv.pool.free_queue),
        [(b.ref_cnt, b.block_hash) for b in kv.pool.blocks],
        dict(kv.pool.cached),
        {rid: list(blocks) for rid, blocks in kv.req_blocks.items()},
        dict(kv.req_num_cached),
    )


def schedule_all(kv: KVCacheManager, request) -> int:
    """Take a request's prefix hits and allocate the rest of its tokens, as the scheduler does
    on first scheduling; return the number of hit tokens."""
    hits, num_hit_tokens = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit_tokens, hits)
    request.num_computed_tokens = request.num_tokens
    return num_hit_tokens


def test_allocate_grow_and_free():
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE, enable_caching=True)
    request = make_request("a", [text(10)])

    assert kv.allocate_slots(request, 10)
    assert len(kv.block_ids("a")) == 3  # ceil(10 / 4)
    assert kv.num_free_blocks == 7
    request.num_computed_tokens = 10

    # Decodes: token 11 and 12 fit the partial third block, token 13 needs a fourth.
    for expected_blocks in (3, 3, 4):
        request.append_output_token(7)
        assert kv.allocate_slots(request, 1)
        request.num_computed_tokens += 1
        assert len(kv.block_ids("a")) == expected_blocks
    assert len(set(kv.block_ids("a"))) == 4
    kv.check_integrity()

    kv.free(request)
    assert kv.num_free_blocks == 10
    assert kv.block_ids("a") == []
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    kv.check_integrity()


def test_shared_blocks_are_reference_counted():
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE, enable_caching=True)
    a = make_request("a", [text(9)])
    b = make_request("b", [text(9)])
    schedule_all(kv, a)
    assert schedule_all(kv, b) == 8

    shared = kv.req_blocks["a"][:2]
    assert kv.req_blocks["b"][:2] == shared
    assert [blk.ref_cnt for blk in shared] == [2, 2]
    assert kv.req_blocks["a"][2] is not kv.req_blocks["b"][2]  # partial last blocks: own
    assert kv.num_free_blocks == 10 - 4
    kv.check_integrity()

    kv.free(a)
    assert [blk.ref_cnt for blk in shared] == [1, 1]
    assert all(blk.block_id not in kv.pool.free_queue for blk in shared)
    kv.check_integrity()

    kv.free(b)
    assert [blk.ref_cnt for blk in shared] == [0, 0]
    assert kv.num_free_blocks == 10
    # Freed, but still findable by hash until reallocated.
    assert [kv.pool.lookup(h) for h in a.block_hashes] == shared
    kv.check_integrity()


def test_lru_eviction_takes_tails_first_and_oldest_request_first():
    kv = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE, enable_caching=True)
    a = make_request("a", [text(12, start=100)])
    b = make_request("b", [text(12, start=200)])
    schedule_all(kv, a)
    schedule_all(kv, b)
    a_blocks, b_blocks = list(kv.req_blocks["a"]), list(kv.req_blocks["b"])
    assert kv.num_free_blocks == 0
    kv.free(a)
    kv.free(b)
    kv.check_integrity()

    # Each allocation evicts one cached block: a's tail, ..., a's head, then b's tail.
    evicted = []
    for i in range(4):
        c = make_request(f"c{i}", [text(3, start=300 + 10 * i)])
        assert kv.allocate_slots(c, 3)
        evicted.append(kv.req_blocks[c.request_id][0])
    assert evicted == [a_blocks[2], a_blocks[1], a_blocks[0], b_blocks[2]]
    assert [kv.pool.lookup(h) for h in a.block_hashes] == [None, None, None]
    assert [kv.pool.lookup(h) for h in b.block_hashes] == [b_blocks[0], b_blocks[1], None]
    assert all(blk.block_hash is None for blk in evicted)
    kv.check_integrity()


def test_a_hit_refreshes_recency():
    kv = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE, enable_caching=True)
    a = make_request("a", [text(12, start=100)])
    b = make_request("b", [text(12, start=200)])
    schedule_all(kv, a)
    schedule_all(kv, b)
    kv.free(a)
    kv.free(b)
    # a's prompt again (one more token): hits a's 3 blocks, which leave the free queue...
    a2 = make_request("a2", [text(12, start=100), [7]])
    assert schedule_all(kv, a2) == 12
    kv.free(a2)  # ... and come back behind b's, so b's are now evicted first.
    c = make_request("c", [text(12, start=300)])
    assert kv.allocate_slots(c, 12)
    assert [kv.pool.lookup(h) for h in b.block_hashes] == [None, None, None]
    assert all(kv.pool.lookup(h) is not None for h in a.block_hashes)
    kv.check_integrity()


def test_prefix_hit_with_same_system_prompt_and_same_image():
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE, enable_caching=True)
    system = text(8, start=100)
    a = make_request("a", [system, Image("cat", 8), text(6, start=200)])
    b = make_request("b", [system, Image("cat", 8), text(6, start=300)])
    schedule_all(kv, a)

    hits, num_hit_tokens = kv.get_computed_blocks(b)
    assert num_hit_tokens == 16  # system prompt and image: 4 full blocks; the question differs
    assert hits == kv.req_blocks["a"][:4]
    assert kv.allocate_slots(b, b.num_tokens - num_hit_tokens, hits)
    assert [blk.ref_cnt for blk in kv.req_blocks["a"][:5]] == [2, 2, 2, 2, 1]
    kv.check_integrity()


def test_same_placeholder_ids_with_another_image_miss():
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE, enable_caching=True)
    system, question = text(8, start=100), text(6, start=200)
    a = make_request("a", [system, Image("cat", 8), question])
    b = make_request("b", [system, Image("dog", 8), question])
    assert a.prompt_token_ids == b.prompt_token_ids  # only the image hash tells them apart
    schedule_all(kv, a)

    hits, num_hit_tokens = kv.get_computed_blocks(b)
    assert num_hit_tokens == 8  # the system prompt's 2 blocks, not one image block more
    assert hits == kv.req_blocks["a"][:2]
    assert a.block_hashes[:2] == b.block_hashes[:2]
    assert all(ha != hb for ha, hb in zip(a.block_hashes[2:], b.block_hashes[2:]))
    kv.check_integrity()


def test_same_image_at_another_offset_misses():
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE, enable_caching=True)
    # Same token ids, but b's image starts one token later (a text token equal to the
    # placeholder id precedes it): the image's offset in the block is part of the key.
    a = make_request("a", [text(3), Image("cat", 9), text(4, start=300)])
    b = make_request("b", [text(3), [PLACEHOLDER_ID], Image("cat", 8), text(4, start=300)])
    assert a.prompt_token_ids == b.prompt_token_ids
    schedule_all(kv, a)
    _, num_hit_tokens = kv.get_computed_blocks(b)
    assert num_hit_tokens == 0
    kv.check_integrity()


def test_a_hit_never_covers_the_last_token():
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE, enable_caching=True)
    a = make_request("a", [text(12)])  # exactly 3 full blocks
    schedule_all(kv, a)
    assert len(a.block_hashes) == 3

    same = make_request("same", [text(12)])
    hits, num_hit_tokens = kv.get_computed_blocks(same)
    assert (len(hits), num_hit_tokens) == (2, 8)  # the last block is recomputed for its logits

    longer = make_request("longer", [text(12), [7]])
    _, num_hit_tokens = kv.get_computed_blocks(longer)
    assert num_hit_tokens == 12
    kv.check_integrity()


def test_allocate_slots_fails_without_changing_anything():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, enable_caching=True)
    a = make_request("a", [text(9)])
    schedule_all(kv, a)  # 3 blocks, 2 of them full and cached
    cached_blocks = kv.req_blocks["a"][:2]
    kv.free(a)
    c = make_request("c", [text(8, start=500)])
    assert kv.allocate_slots(c, 8)  # takes the never-used block and a's partial one
    assert set(kv.pool.free_queue) == {blk.block_id for blk in cached_blocks}
    kv.check_integrity()

    # b hits a's 2 freed blocks and needs 1 more: 3 free blocks needed, 2 there.
    b = make_request("b", [text(9)])
    hits, num_hit_tokens = kv.get_computed_blocks(b)
    assert hits == cached_blocks
    before = snapshot(kv)
    assert not kv.allocate_slots(b, b.num_tokens - num_hit_tokens, hits)
    assert snapshot(kv) == before
    assert "b" not in kv.req_blocks
    kv.check_integrity()

    # A running request that asks for more than the pool has keeps what it holds.
    c.num_computed_tokens = 8
    before = snapshot(kv)
    assert not kv.allocate_slots(c, 9)
    assert snapshot(kv) == before
    kv.check_integrity()

    # Once c is gone, b fits, and its hits are still there.
    kv.free(c)
    assert kv.allocate_slots(b, b.num_tokens - num_hit_tokens, hits)
    assert kv.req_blocks["b"][:2] == cached_blocks
    kv.check_integrity()


def test_blocks_cached_at_allocation_hit_in_the_same_step():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_caching=True)
    a = make_request("a", [text(8), Image("cat", 8), text(3, start=200)])
    b = make_request("b", [text(8), Image("cat", 8), text(3, start=300)])
    # a is scheduled (num_computed_tokens still 0: the step has not run); b comes next.
    assert kv.allocate_slots(a, a.num_tokens)
    hits, num_hit_tokens = kv.get_computed_blocks(b)
    assert num_hit_tokens == 16
    assert hits == kv.req_blocks["a"][:4]
    assert kv.allocate_slots(b, b.num_tokens - num_hit_tokens, hits)
    kv.check_integrity()


def test_only_scheduled_blocks_are_cached():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_caching=True)
    a = make_request("a", [text(16)])
    assert kv.allocate_slots(a, 6)  # a chunk: block 0 full, block 1 half
    assert len(kv.pool.cached) == 1
    _, num_hit_tokens = kv.get_computed_blocks(make_request("b", [text(16)]))
    assert num_hit_tokens == 4

    a.num_computed_tokens = 6
    assert kv.allocate_slots(a, 6)  # next chunk: blocks 1 and 2 now full
    assert len(kv.pool.cached) == 3
    _, num_hit_tokens = kv.get_computed_blocks(make_request("c", [text(16)]))
    assert num_hit_tokens == 12
    kv.check_integrity()


def test_lora_id_changes_every_block_hash():
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE, enable_caching=True)
    segments = [text(8), Image("cat", 8), text(5)]
    base = make_request("base", segments)
    lora1 = make_request("lora1", segments, lora_int_id=1)
    lora2 = make_request("lora2", segments, lora_int_id=2)
    for request in (base, lora1, lora2):
        update_block_hashes(request, BLOCK_SIZE)
    for x, y in ((base, lora1), (base, lora2), (lora1, lora2)):
        assert all(hx != hy for hx, hy in zip(x.block_hashes, y.block_hashes))

    schedule_all(kv, lora1)
    assert kv.get_computed_blocks(make_request("other", segments, lora_int_id=1))[1] == 20
    assert kv.get_computed_blocks(make_request("base2", segments))[1] == 0
    assert kv.get_computed_blocks(make_request("l2", segments, lora_int_id=2))[1] == 0
    kv.check_integrity()


def test_caching_disabled_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_caching=False)
    a = make_request("a", [text(13)])
    assert kv.allocate_slots(a, 13)
    assert kv.pool.cached == {}
    assert kv.get_computed_blocks(make_request("b", [text(13)])) == ([], 0)
    kv.free(a)
    kv.check_integrity()


def test_block_pool_free_order_and_touch():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert pool.num_free_blocks == 1
    pool.cache_block(blocks[0], b"h0")
    pool.free(list(reversed(blocks)))
    assert list(pool.free_queue) == [3, 2, 1, 0]
    pool.touch([blocks[0]])  # a hit takes it out of the free queue
    assert blocks[0].ref_cnt == 1 and 0 not in pool.free_queue
    pool.touch([blocks[0]])
    assert blocks[0].ref_cnt == 2
    pool.free([blocks[0]])
    assert 0 not in pool.free_queue
    pool.free([blocks[0]])
    assert list(pool.free_queue) == [3, 2, 1, 0]
    assert pool.lookup(b"h0") is blocks[0]
    pool.check_integrity()


def test_block_table_rows_grow_release_and_gather():
    table = BlockTable(num_rows=2, num_cols=2)
    table.append("a", [5, 6])
    table.append("b", [7])
    table.append("a", [8, 9, 10])  # wider than the table: columns grow
    table.append("c", [11])  # a third row: rows grow
    step = table.gather(["c", "a", "b"])
    assert step.dtype == np.int32
    assert step.tolist() == [[11, -1, -1, -1, -1], [5, 6, 8, 9, 10], [7, -1, -1, -1, -1]]
    table.append("a", [12])
    assert step[1].tolist() == [5, 6, 8, 9, 10]  # a step's table is a copy
    table.release("a")
    table.append("d", [1])  # reuses a's row, reset to -1 past its blocks
    assert table.gather(["d"]).tolist() == [[1]]
    assert table.row("a").tolist() == []


def test_new_block_ids_reach_a_worker_table_that_follows_allocations():
    """What the scheduler takes with `take_new_block_ids` (for the step records) rebuilds, on
    the worker's side, exactly the blocks each request holds."""
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_caching=False)
    worker = BlockTable(num_rows=1, num_cols=1)
    a, b = make_request("a", [text(9)]), make_request("b", [text(3)])
    assert kv.allocate_slots(a, 9) and kv.allocate_slots(b, 3)
    for request_id in ("a", "b"):
        worker.append(request_id, kv.take_new_block_ids(request_id))
    assert kv.take_new_block_ids("a") == []  # taken once
    a.num_computed_tokens, b.num_computed_tokens = 9, 3
    assert 3 * BLOCK_SIZE >= 10  # room for a 10th token in a's blocks
    assert kv.allocate_slots(a, 1) and kv.take_new_block_ids("a") == []
    assert kv.allocate_slots(b, 14)  # 17 tokens
    new = kv.take_new_block_ids("b")
    assert len(new) == -(-17 // BLOCK_SIZE) - -(-3 // BLOCK_SIZE) > 0
    worker.append("b", new)
    pad = [-1] * (len(kv.block_ids("b")) - len(kv.block_ids("a")))
    assert worker.gather(["b", "a"]).tolist() == [kv.block_ids("b"), kv.block_ids("a") + pad]
    kv.free(a)
    assert kv.block_ids("a") == [] and kv.take_new_block_ids("a") == []
    a.num_computed_tokens = 0  # preempted: recomputed from the start
    assert kv.allocate_slots(a, 9)  # all its blocks are new
    assert kv.take_new_block_ids("a") == kv.block_ids("a")
    assert len(kv.block_ids("a")) == -(-9 // BLOCK_SIZE)
    kv.check_integrity()
