"""Antialiased uint8 resize that equals torch's CPU kernel bit for bit, on any device.

HF's image processors resize uint8 images on the CPU by default, where torch (and torchvision on
top of it) uses a fixed-point separable kernel: PIL's algorithm, int16-range weights. On CUDA
torch resizes in float32 and rounds, which differs by up to ~17 levels at sharp edges (and has
no LANCZOS at all). `resize_uint8` gives the CPU kernel's output wherever the images are:

```
uint8 [B, C, H, W] --width pass--> int32 [B, C, H, width] --height pass--> uint8 [B, C, h, w]
each pass, per output pixel o:  (sum_j src[index[o, j]] * w[o, j] + 2**(p-1)) >> p, in 0..255
```

The taps (`index`, `w`, `p`) are torch's `_compute_indices_min_size_weights_aa` /
`_compute_index_ranges_int16_weights`; only the filter kernel and its support differ. A caller
that resizes the same sizes again (a processor) owns a `ResizeTaps` and passes it in, so the taps
are built and copied to the device once per (sizes, filter, device).
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as tvF

Filter = Literal["bicubic", "bilinear", "lanczos"]


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic with a = -0.5 (PIL's), in torch's evaluation order (`HelperInterpCubic`)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    """The triangle filter."""
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    """PIL's Lanczos-3 window, `sinc(x) * sinc(x / 3)` on [-3, 3), as torch's CPU kernel has it."""

    def sinc(v: torch.Tensor) -> torch.Tensor:
        return torch.where(v == 0, torch.ones_like(v), torch.sin(v * math.pi) / (v * math.pi))

    return torch.where((x >= -3) & (x < 3), sinc(x) * sinc(x / 3), torch.zeros_like(x))


# filter -> (kernel, support in source pixels at scale 1)
_FILTERS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "bicubic": (_bicubic, 2.0),
    "bilinear": (_bilinear, 1.0),
    "lanczos": (_lanczos, 3.0),
}


Taps = tuple[torch.Tensor, torch.Tensor, int]  # index [out, taps], weights [out, taps], p


def _taps(
    in_size: int, out_size: int, filter: Filter, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fixed-point antialiased taps of one axis, as torch's CPU uint8 kernel computes them.

    Returns source indexes [out, taps] int64, int16-range weights [out, taps] int32 (0 past each
    output's window) and their precision p in bits: out = (sum(src * w) + 2**(p-1)) >> p.
    """
    kernel, base_support = _FILTERS[filter]
    scale = in_size / out_size
    support = base_support * scale if scale >= 1.0 else base_support
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    num_taps = math.ceil(support) * 2 + 1
    center = scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)  # [out]
    first = (center - support + 0.5).trunc().clamp(min=0)  # [out] (C++ casts truncate)
    width = ((center + support + 0.5).trunc().clamp(max=in_size) - first).clamp(0, num_taps)
    tap = torch.arange(num_taps, dtype=torch.float64)  # [taps]
    weights = kernel((tap + first[:, None] - center[:, None] + 0.5) * inv_scale)
    weights = torch.where(tap < width[:, None], weights, 0.0)  # [out, taps] float64
    total = torch.zeros(out_size, dtype=torch.float64)
    for j in range(num_taps):  # NOTE: summed in tap order, as the C++ loop does, for equal bits
        total = total + weights[:, j]
    weights = torch.where(total[:, None] != 0, weights / total[:, None], weights)
    wt_max = weights.max().item()
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = torch.where(scaled < 0, (scaled - 0.5).trunc(), (scaled + 0.5).trunc())
    index = (first[:, None] + tap).clamp(max=in_size - 1).long()  # [out, taps]
    return index.to(device), fixed.to(device, torch.int32), precision


class ResizeTaps:
    """A bounded LRU of the taps of `resize_uint8_fixed_point`, owned by its caller (each
    processor holds one): (in size, out size, filter, device) -> taps on that device.
    Safe to share between the threads that process prompts."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Taps] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, in_size: int, out_size: int, filter: Filter, device: torch.device) -> Taps:
        key = (in_size, out_size, filter, device)
        with self._lock:
            taps = self._entries.get(key)
            if taps is not None:
                self._entries.move_to_end(key)
                return taps
        taps = _taps(in_size, out_size, filter, device)  # NOTE: built outside the lock
        with self._lock:
            self._entries[key] = taps
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return taps


def _resample_axis(
    x: torch.Tensor, dim: int, out_size: int, filter: Filter, taps: ResizeTaps | None
) -> torch.Tensor:
    """One fixed-point pass along `dim` of an int32 [B, C, H, W] tensor holding 0..255."""
    if taps is None:
        index, weights, precision = _taps(x.shape[dim], out_size, filter, x.device)
    else:
        index, weights, precision = taps.get(x.shape[dim], out_size, filter, x.device)
    shape = [1, 1, 1, 1]
    shape[dim] = out_size
    acc = torch.full((), 1 << (precision - 1), dtype=torch.int32, device=x.device)
    for j in range(index.shape[1]):  # NOTE: |acc| < 2**31, as sum(|w|) < 1.3 * 2**22
        acc = acc + x.index_select(dim, index[:, j]) * weights[:, j].view(shape)
    return acc.bitwise_right_shift_(precision).clamp_(0, 255)


def resize_uint8_fixed_point(
    images: Tensor, height: int, width: int, filter: Filter, taps: ResizeTaps | None = None
) -> Tensor:
    """uint8 [B, C, H, W] -> [B, C, height, width]: torch's CPU uint8 kernel in tensor ops, on
    the images' device (a width pass, then a height pass, each rounded to 0..255). The taps
    come from `taps` when given, else they are built for this call."""
    x = images.to(torch.int32)  # [B, C, H, W]
    if width != x.shape[-1]:
        x = _resample_axis(x, 3, width, filter, taps)
    if height != x.shape[-2]:
        x = _resample_axis(x, 2, height, filter, taps)
    return x.to(torch.uint8)


@functools.cache
def _torch_has_lanczos() -> bool:
    """Whether this torch's `interpolate` has an antialiased lanczos mode (newer releases do;
    without it the fixed-point kernel gives the same result)."""
    try:
        probe = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
        torch.nn.functional.interpolate(probe, size=[2, 2], mode="lanczos", antialias=True)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


def resize_uint8(
    images: Tensor, height: int, width: int, filter: Filter, taps: ResizeTaps | None = None
) -> Tensor:
    """uint8 [B, C, H, W] -> [B, C, height, width], antialiased, on any device equal to torch's
    CPU uint8 kernel (`taps`: the caller's cache of the fixed-point kernel's taps).

    On the CPU this calls that kernel as HF does (torchvision's `resize` for bicubic and
    bilinear; `interpolate` for lanczos, which torchvision lacks); elsewhere it runs
    `resize_uint8_fixed_point`.
    """
    if images.device.type != "cpu" or (filter == "lanczos" and not _torch_has_lanczos()):
        return resize_uint8_fixed_point(images, height, width, filter, taps)
    if filter == "lanczos":
        return torch.nn.functional.interpolate(
            images, size=[height, width], mode="lanczos", antialias=True, align_corners=False
        )
    mode = tvF.InterpolationMode.BICUBIC if filter == "bicubic" else tvF.InterpolationMode.BILINEAR
    return tvF.resize(images, [height, width], mode, antialias=True)
