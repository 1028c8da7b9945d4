"""Triton, imported guarded, and whether its kernels can run on a device.

Without Triton (torch wheels without CUDA, e.g. macOS) the kernel modules still import and
`triton_available` says False. With `TRITON_INTERPRET=1` the kernels run on CPU tensors in
Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # NOTE: torch wheels without CUDA (macOS) come without Triton
    triton = None
    tl = None

__all__ = ["interpret", "num_sms", "tl", "triton", "triton_available"]


def triton_available(device: torch.device | str) -> bool:
    """Whether the kernels of `vlmx.ops` run on tensors of `device`.

    CUDA when Triton is importable; CPU only under Triton's interpreter (`TRITON_INTERPRET=1`).
    """
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_available()
    return device.type == "cpu" and interpret()


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def interpret() -> bool:
    """Whether Triton runs kernels in its interpreter."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def num_sms(device: torch.device, default: int) -> int:
    """The device's streaming multiprocessors (`default` off CUDA, for the interpreter)."""
    if device.type != "cuda":
        return default
    return torch.cuda.get_device_properties(device).multi_processor_count
