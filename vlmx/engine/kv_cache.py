"""Paged KV cache bookkeeping: a block pool, and a prefix cache keyed by content.

A block holds `block_size` consecutive tokens of one sequence. A full block gets a hash that
chains its parent's hash, its token ids, and the images its tokens belong to, so two requests
that share a system prompt and an image share blocks, and two that differ only in the image
(whose placeholder token ids are identical) do not.

```
request tokens: [sys sys sys sys | sys <vs> P P | P P P P | P <ve> q q | q ...]
block hashes:     h0=H(-, ids)      h1=H(h0, ids, img)  h2=H(h1, ids, img)  (partial: none)
```

Blocks with `ref_cnt == 0` sit in the free queue in eviction order (least recently freed first);
a cached one stays findable by hash until it is reallocated.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

import blake3

from vlmx.engine.request import Request


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


def hash_block(parent_hash: bytes | None, token_ids: list[int], extra_keys: tuple = ()) -> bytes:
    hasher = blake3.blake3(parent_hash or b"")
    hasher.update(array("q", token_ids).tobytes())
    if extra_keys:
        hasher.update(repr(extra_keys).encode())
    return hasher.digest()


def block_extra_keys(request: Request, start: int, end: int) -> tuple:
    """The images (and LoRA) that shape the KV of tokens start..end-1 beyond their ids."""
    keys: list = []
    if start == 0 and request.lora_int_id:
        keys.append(("lora", request.lora_int_id))
    if start == 0 and request.prefix_extra_keys:
        keys.append(("prompt", request.prefix_extra_keys))
    for feature in request.mm_features:
        p = feature.placeholder
        if p.offset >= end:
            break
        if p.end > start:
            keys.append((feature.mm_hash, p.offset - start))
    return tuple(keys)


def update_block_hashes(request: Request, block_size: int) -> None:
    """Extend `request.block_hashes` to cover every full block of its current tokens."""
    # NOTE: a block holding a reserved (not yet sampled) token is hashed once it is filled in.
    num_full = (request.num_tokens - request.placeholder_pending) // block_size
    for i in range(len(request.block_hashes), num_full):
        start, end = i * block_size, (i + 1) * block_size
        parent = request.block_hashes[-1] if request.block_hashes else None
        request.block_hashes.append(
            hash_block(
                parent, request.all_token_ids[start:end], block_extra_keys(request, start, end)
            )
        )


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        assert num_blocks > 0
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[KVBlock]:
        assert n <= len(self.free_queue), (n, len(self.free_queue))
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:  # evict it from the prefix cache
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits (pulling free ones out of the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop a reference; pass a request's blocks tail first so tails are evicted first."""
        for block in blocks:
            assert block.ref_cnt > 0, block
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)

    def reset_cache(self) -> None:
        """Forget every block's hash (no later request hits them); blocks in use stay held."""
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash)

    def check_integrity(self) -> None:
        free_ids = set(self.free_queue)
        for block in self.blocks:
            assert block.ref_cnt >= 0
            assert (block.ref_cnt == 0) == (block.block_id in free_ids), block
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash


class KVCacheManager:
    """Which blocks each running request holds, and prefix-cache lookups for new requests."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        # Block ids given to each request since the scheduler last took them (the step records
        # carry them to the workers, which keep their own block tables).
        self.new_block_ids: dict[str, list[int]] = {}
        self.req_num_cached: dict[str, int] = {}  # full blocks already entered in the cache

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def take_new_block_ids(self, request_id: str) -> list[int]:
        """The block ids `request_id` was given since the last call (all of them, the first
        time and after it was freed)."""
        return self.new_block_ids.pop(request_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of a request not yet scheduled: (blocks, tokens they hold).

        At least one token is left to compute, since its logits give the next token.
        """
        if not self.enable_caching:
            return [], 0
        update_block_hashes(request, self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None = None,
    ) -> bool:
        """Give `request` blocks for `num_new_tokens` more tokens; False (and no change) if the
        pool is short. `computed_blocks` are prefix-cache hits taken on first scheduling."""
        held = self.req_blocks.get(request.request_id)
        if not computed_blocks and held:  # a running request (a decode step, mostly)
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(held) * self.block_size:  # room in the blocks it holds
                if self.enable_caching and total // self.block_size > self.req_num_cached.get(
                    request.request_id, 0
                ):
                    self._cache_full_blocks(request, total)
                return True
        computed_blocks = computed_blocks or []
        held = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = -(-total // self.block_size) - len(held) - len(computed_blocks)
        num_evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed + num_evictable_hits > self.pool.num_free_blocks:
            if not held:
                del self.req_blocks[request.request_id]
            return False
        self.pool.touch(computed_blocks)
        new_blocks = computed_blocks + (self.pool.allocate(num_needed) if num_needed > 0 else [])
        held.extend(new_blocks)
        if new_blocks:
            self.new_block_ids.setdefault(request.request_id, []).extend(
                b.block_id for b in new_blocks
            )
        if self.enable_caching:
            self._cache_full_blocks(request, total)
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        # NOTE: blocks are entered when scheduled, before the step writes them. A request that
        # hits them in the same step is still correct: each layer stores the whole batch's K/V
        # before any sequence attends.
        update_block_hashes(request, self.block_size)
        blocks = self.req_blocks[request.request_id]
        num_full = min(num_tokens // self.block_size, len(request.block_hashes))
        start = self.req_num_cached.get(request.request_id, 0)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.req_num_cached[request.request_id] = max(start, num_full)

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.new_block_ids.pop(request.request_id, None)
        self.req_num_cached.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)))

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        assert self.new_block_ids.keys() <= self.req_blocks.keys()
        refs: dict[int, int] = {}
        for request_id, blocks in self.req_blocks.items():
            new = self.new_block_ids.get(request_id, [])
            assert new == [b.block_id for b in blocks[len(blocks) - len(new) :]], request_id
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == refs.get(block.block_id, 0), (block, refs.get(block.block_id))
