"""Content hashes that key the processor, encoder and prefix caches."""

from __future__ import annotations

import blake3
import torch


def hash_image(image: torch.Tensor) -> str:
    """blake3 over the pixels and the shape of a uint8 [3, H, W] image tensor."""
    assert image.dtype == torch.uint8, image.dtype
    hasher = blake3.blake3()
    hasher.update(repr(tuple(image.shape)).encode())
    hasher.update(image.contiguous().cpu().numpy())  # NOTE: its buffer, not a copy of it
    return hasher.hexdigest()


def hash_with_settings(content_hash: str, settings: dict) -> str:
    """Combine a content hash with the settings that shape the output (sorted, so order-free)."""
    text = content_hash + repr(sorted(settings.items()))
    return blake3.blake3(text.encode()).hexdigest()
