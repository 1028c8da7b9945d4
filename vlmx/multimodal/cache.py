"""A byte-bounded LRU cache of tensors, shared by the image loaders and the processors."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

Entry = TypeVar("Entry", torch.Tensor, tuple[torch.Tensor, ...])
Input = TypeVar("Input")


def _num_bytes(entry: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    tensors = (entry,) if isinstance(entry, torch.Tensor) else entry
    return sum(t.numel() * t.element_size() for t in tensors)


class TensorCache(Generic[Entry]):
    """Tensors (or tuples of tensors) by a string key, least recently used out first, bounded
    by the bytes of their tensors. An entry larger than the bound is not kept. The processors'
    outputs by mm_hash (`vlmx.models.processing`) and decoded data URLs (`media.DataURLCache`).

    Safe to use from several threads (the engine processes prompts on a pool): each method holds
    a lock while it reads or changes the entries; `get_or_compute` computes outside it.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.num_bytes = 0

    def put(self, key: str, entry: Entry) -> None:
        size = _num_bytes(entry)
        with self._lock:
            if key in self._entries or size > self.capacity_bytes:
                return
            while self.num_bytes + size > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self.num_bytes -= _num_bytes(old)
            self._entries[key] = entry
            self.num_bytes += size

    def get_or_compute(
        self,
        keys: list[str],
        inputs: list[Input],
        compute: Callable[[list[Input]], list[Entry]],
    ) -> list[Entry]:
        """The entry of each key. `compute` gets, in one call, the inputs whose key is in no
        entry (each key once); its outputs are stored under their keys.

        NOTE: two threads that miss the same key both compute it; the first `put` is kept.
        """
        found = {k: entry for k in keys if (entry := self.get(k)) is not None}
        missing = {k: x for k, x in zip(keys, inputs, strict=True) if k not in found}
        if missing:
            for key, entry in zip(missing, compute(list(missing.values())), strict=True):
                found[key] = entry
                self.put(key, entry)
        return [found[k] for k in keys]
