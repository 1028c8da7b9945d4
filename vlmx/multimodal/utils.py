"""The module path vLLM's examples import from: `vllm.multimodal.utils.fetch_image`.

With `from vllm` edited to `from vlmx`, `from vlmx.multimodal.utils import fetch_image` resolves
to vlmx's loader (`vlmx.multimodal.media.fetch_image`).
"""

from vlmx.multimodal.media import fetch_image

__all__ = ["fetch_image"]
