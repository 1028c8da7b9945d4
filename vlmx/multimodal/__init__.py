"""Multimodal inputs: image loading, chat messages, content hashes."""

from vlmx.multimodal.loader import MediaLoader
from vlmx.multimodal.media import MediaLimits, fetch_image, load_image

__all__ = ["MediaLimits", "MediaLoader", "fetch_image", "load_image"]
