"""Host data to the device without waiting for the GPU.

A copy from pageable host memory returns only once the GPU has run everything queued before it,
which stalls the host (and then starves the GPU) once per call; from pinned memory the copy is
queued like a kernel. Every small host-built tensor the engine sends (index tensors, sampling
parameters, segment boundaries) goes through `host_to_device`; a step's inputs go through the
runner's reusable pinned block (`worker.input_batch.StagingBuffer`) instead.
"""

from __future__ import annotations

import numpy as np
import torch


def host_to_device(
    data: torch.Tensor | np.ndarray | list, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`data` (a CPU tensor, array or nested list) as a tensor on `device`; on CUDA through
    pinned memory, without blocking."""
    host = torch.as_tensor(
        data if isinstance(data, torch.Tensor) else np.asarray(data), dtype=dtype
    )
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
