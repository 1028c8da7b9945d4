"""EncoderCacheManager: references per request, unreferenced entries kept for reuse, LRU eviction
of unreferenced entries only, capacity. Every test ends with the cache's own integrity check."""

from __future__ import annotations

import random

from vlmx.engine.encoder_cache import EncoderCacheManager


def test_allocate_add_ref_release():
    cache = EncoderCacheManager(capacity=100)
    assert not cache.contains("cat")
    cache.allocate("cat", 30, "r1")
    assert cache.contains("cat")
    assert cache.num_used == 30 and cache.num_free() == 70
    cache.add_ref("cat", "r2")
    cache.add_ref("cat", "r2")  # idempotent per request
    assert cache.refs["cat"] == {"r1", "r2"}
    cache.check_integrity()

    cache.release("cat", "r1")
    assert "cat" not in cache.releasable  # r2 still needs it
    cache.release("cat", "r1")  # a second release is a no-op
    cache.release("cat", "r3")  # so is a release by a request that holds nothing
    assert cache.refs["cat"] == {"r2"}
    cache.check_integrity()

    cache.release("cat", "r2")
    assert "cat" not in cache.refs and "cat" in cache.releasable
    assert cache.contains("cat")  # kept: nobody needs it, but the next request may
    assert cache.num_used == 30 and cache.num_free() == 100
    assert cache.take_freed() == []
    cache.check_integrity()


def test_unreferenced_entry_is_reused_not_reencoded():
    cache = EncoderCacheManager(capacity=100)
    cache.allocate("cat", 40, "r1")
    cache.release_all("r1", ["cat"])
    assert "cat" in cache.releasable

    # A later request with the same image takes a reference instead of allocating again.
    assert cache.contains("cat")
    cache.add_ref("cat", "r2")
    assert "cat" not in cache.releasable and cache.refs["cat"] == {"r2"}
    assert cache.num_used == 40 and cache.num_free() == 60
    # Now referenced, it cannot be evicted: 61 embeddings do not fit.
    assert not cache.can_allocate(61)
    assert cache.can_allocate(60)
    cache.allocate("dog", 60, "r2")
    assert cache.take_freed() == []
    assert cache.num_used == 100
    cache.check_integrity()


def test_lru_evicts_only_unreferenced_least_recently_released_first():
    cache = EncoderCacheManager(capacity=30)
    for mm_hash, request_id in (("a", "r1"), ("b", "r2"), ("c", "r3")):
        cache.allocate(mm_hash, 10, request_id)
    cache.release("b", "r2")
    cache.release("a", "r1")  # released after b: b is evicted first
    assert list(cache.releasable) == ["b", "a"]
    assert cache.num_free() == 20 and cache.can_allocate(20) and not cache.can_allocate(21)
    cache.check_integrity()

    cache.allocate("d", 5, "r4")
    assert cache.take_freed() == ["b"]
    assert cache.take_freed() == []  # reported once
    assert not cache.contains("b") and cache.contains("a") and cache.contains("c")
    cache.check_integrity()

    cache.allocate("e", 10, "r5")  # 5 free + a's 10
    assert cache.take_freed() == ["a"]
    assert set(cache.entries) == {"c", "d", "e"}  # c, referenced all along, stays
    assert cache.num_used == 25
    cache.check_integrity()


def test_evictions_accumulate_until_taken():
    cache = EncoderCacheManager(capacity=20)
    cache.allocate("a", 10, "r1")
    cache.allocate("b", 10, "r2")
    cache.release_all("r1", ["a"])
    cache.release_all("r2", ["b"])
    cache.allocate("c", 15, "r3")  # needs both
    cache.allocate("a", 5, "r3")  # a again, re-encoded: it was evicted
    assert cache.take_freed() == ["a", "b"]
    assert cache.refs == {"c": {"r3"}, "a": {"r3"}}
    cache.check_integrity()


def test_capacity_never_exceeded_under_random_traffic():
    rng = random.Random(0)
    capacity = 64
    cache = EncoderCacheManager(capacity)
    sizes = {f"img{i}": rng.randint(1, 24) for i in range(12)}
    held: dict[str, set[str]] = {}  # request id -> hashes it references (our own model)
    evicted: list[str] = []
    for op in range(2000):
        request_id = f"r{rng.randrange(6)}"
        mm_hash = rng.choice(list(sizes))
        if rng.random() < 0.6:
            if cache.contains(mm_hash):
                cache.add_ref(mm_hash, request_id)
                held.setdefault(request_id, set()).add(mm_hash)
            elif cache.can_allocate(sizes[mm_hash]):
                referenced = set(cache.refs)
                cache.allocate(mm_hash, sizes[mm_hash], request_id)
                held.setdefault(request_id, set()).add(mm_hash)
                freed = cache.take_freed()
                assert not set(freed) & referenced, op  # never a referenced entry
                evicted.extend(freed)
        else:
            cache.release_all(request_id, list(held.pop(request_id, ())))
        assert cache.num_used <= capacity
        # Our model of references matches the cache's.
        for rid, hashes in held.items():
            assert all(rid in cache.refs[h] for h in hashes)
        cache.check_integrity()
    assert evicted  # the traffic did force evictions
    cache.check_integrity()
