"""Qwen2.5-VL: Qwen2-VL's decoder with a windowed-attention vision tower.

HF reference: `transformers.Qwen2_5_VLForConditionalGeneration` (transformers 5). The decoder,
the interface methods and the weight-name mapping are Qwen2-VL's; only the tower differs
(`layers.qwen_vision.Qwen2_5_VisionTransformer`).
"""

from __future__ import annotations

from torch import nn

from vlmx.layers.qwen_vision import Qwen2_5_VisionTransformer
from vlmx.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vlmx.models.qwen2_vl_processor import Qwen2VLProcessor  # noqa: F401


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """The vlmx model interface for Qwen2.5-VL; see `Qwen2VLForConditionalGeneration`."""

    def build_visual(self, vision_config) -> nn.Module:
        return Qwen2_5_VisionTransformer(vision_config)
