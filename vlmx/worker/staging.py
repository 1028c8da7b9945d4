"""The pinned host memory a step's inputs reach the GPU through.

`StagingBuffer` is the reusable pinned block every step's inputs are copied through
(`vlmx.device.host_to_device` pins afresh, which is fine for one-off tensors but slow once per
step).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class StagingBuffer:
    """Pinned host memory reused by every step for its inputs.

    `torch.Tensor.pin_memory()` allocates (and registers) new pinned memory per call, which is
    slow; here each step bump-allocates from one of two pinned halves, alternating, so that a
    step can be staged while the one before it still runs (async scheduling). `begin` waits
    until the copies of the step two back have left the half it reuses.
    """

    def __init__(self, device: torch.device, num_bytes: int = 32 << 20) -> None:
        self.device = device
        self.buffers = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True).chunk(2)
        self.copies_done: list[torch.cuda.Event | None] = [None, None]
        self.half = 1
        self.offset = 0

    @property
    def buffer(self) -> torch.Tensor:
        return self.buffers[self.half]

    def begin(self) -> None:
        self.half ^= 1
        event = self.copies_done[self.half]
        if event is not None:
            event.synchronize()
            self.copies_done[self.half] = None
        self.offset = 0

    def end(self) -> None:
        event = torch.cuda.Event()
        event.record()
        self.copies_done[self.half] = event

    def stage(self, array: np.ndarray | list, dtype: torch.dtype) -> torch.Tensor:
        """A pinned host tensor holding `array` (valid until this half is reused)."""
        host = torch.as_tensor(np.asarray(array), dtype=dtype)
        pinned = self.empty(tuple(host.shape), dtype)
        pinned.copy_(host)
        return pinned

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised pinned memory from this half (e.g. for a copy back from the device),
        valid until the half is reused two steps on."""
        size = math.prod(shape) * dtype.itemsize
        start = -(-self.offset // 16) * 16
        if start + size > self.buffer.numel():
            return torch.empty(shape, dtype=dtype, pin_memory=True)  # unusually large: its own
        self.offset = start + size
        return self.buffer[start : start + size].view(dtype).view(shape)

    def to_device(self, array: np.ndarray | list, dtype: torch.dtype) -> torch.Tensor:
        return self.stage(array, dtype).to(self.device, non_blocking=True)
