"""Multimodal inputs: image loading, chat messages, content hashes."""

from vlmx.multimodal.media import MediaLimits, fetch_image, load_image

__all__ = ["MediaLimits", "fetch_image", "load_image"]
