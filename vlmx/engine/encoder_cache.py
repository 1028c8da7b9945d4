"""Which images' encoder outputs live on the device, and which requests still need them.

Entries are keyed by `mm_hash`, so an image shared by many requests is encoded once. A request
holds a reference on an image from the step that schedules its first placeholder token until
the step that consumes its last one. Entries nobody references stay cached (for the next
request with the same image) until space is needed, least recently released first.
Capacity is counted in embeddings (one per placeholder token).
"""

from __future__ import annotations

from collections import OrderedDict


class EncoderCacheManager:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[str, int] = {}  # mm_hash -> num_embeds, present or being computed
        self.refs: dict[str, set[str]] = {}  # mm_hash -> ids of requests that still need it
        self.releasable: OrderedDict[str, int] = OrderedDict()  # unreferenced entries, LRU first
        self.num_used = 0  # embeddings held by all entries
        self.freed: list[str] = []  # evicted since the last `take_freed()`

    def contains(self, mm_hash: str) -> bool:
        return mm_hash in self.entries

    def num_free(self) -> int:
        """Embeddings that can be made available (free space plus releasable entries)."""
        return self.capacity - self.num_used + sum(self.releasable.values())

    def can_allocate(self, num_embeds: int) -> bool:
        return num_embeds <= self.num_free()

    def add_ref(self, mm_hash: str, request_id: str) -> None:
        assert mm_hash in self.entries
        self.releasable.pop(mm_hash, None)
        self.refs.setdefault(mm_hash, set()).add(request_id)

    def allocate(self, mm_hash: str, num_embeds: int, request_id: str) -> None:
        assert mm_hash not in self.entries
        while self.capacity - self.num_used < num_embeds:
            victim, size = self.releasable.popitem(last=False)
            del self.entries[victim]
            self.refs.pop(victim, None)
            self.num_used -= size
            self.freed.append(victim)
        self.entries[mm_hash] = num_embeds
        self.num_used += num_embeds
        self.add_ref(mm_hash, request_id)

    def release(self, mm_hash: str, request_id: str) -> None:
        holders = self.refs.get(mm_hash)
        if holders is None or request_id not in holders:
            return
        holders.discard(request_id)
        if not holders:
            del self.refs[mm_hash]
            self.releasable[mm_hash] = self.entries[mm_hash]

    def release_all(self, request_id: str, mm_hashes: list[str]) -> None:
        for mm_hash in mm_hashes:
            self.release(mm_hash, request_id)

    def clear(self) -> None:
        """Drop every entry; only when no request holds one (no unfinished requests)."""
        assert not self.refs, "encoder cache entries are still referenced"
        self.entries.clear()
        self.releasable.clear()
        self.num_used = 0
        self.freed.clear()

    def take_freed(self) -> list[str]:
        freed, self.freed = self.freed, []
        return freed

    def check_integrity(self) -> None:
        assert self.num_used == sum(self.entries.values()) <= self.capacity
        for mm_hash in self.releasable:
            assert mm_hash in self.entries and mm_hash not in self.refs
        for mm_hash, holders in self.refs.items():
            assert holders and mm_hash in self.entries and mm_hash not in self.releasable
        assert set(self.entries) == set(self.refs) | set(self.releasable)
