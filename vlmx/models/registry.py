"""Architecture name (as in a checkpoint's config.json) -> (module in vlmx.models, class).

Modules are imported only when their architecture is asked for.
"""

from __future__ import annotations

import importlib

# architecture -> (module, model class, processor class)
_MODELS: dict[str, tuple[str, str, str]] = {
    "Qwen2VLForConditionalGeneration": (
        "qwen2_vl",
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLProcessor",
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2VLProcessor",
    ),
    "Gemma3ForConditionalGeneration": (
        "gemma3",
        "Gemma3ForConditionalGeneration",
        "Gemma3Processor",
    ),
    "Idefics3ForConditionalGeneration": (
        "idefics3",
        "Idefics3ForConditionalGeneration",
        "Idefics3Processor",
    ),
    "SmolVLMForConditionalGeneration": (
        "idefics3",
        "SmolVLMForConditionalGeneration",
        "Idefics3Processor",
    ),
    "LlavaForConditionalGeneration": (
        "pixtral",
        "LlavaPixtralForConditionalGeneration",
        "PixtralProcessor",
    ),
    "Mistral3ForConditionalGeneration": (
        "pixtral",
        "Mistral3ForConditionalGeneration",
        "PixtralProcessor",
    ),
    "InternVLForConditionalGeneration": (
        "internvl",
        "InternVLForConditionalGeneration",
        "InternVLProcessor",
    ),
    "LlavaOnevisionForConditionalGeneration": (
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionProcessor",
    ),
    "Qwen3VLForConditionalGeneration": (
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        "Qwen2VLProcessor",
    ),
    "AriaForConditionalGeneration": (
        "aria",
        "AriaForConditionalGeneration",
        "AriaProcessor",
    ),
    "MllamaForConditionalGeneration": (
        "mllama",
        "MllamaForConditionalGeneration",
        "MllamaProcessor",
    ),
    "Phi4MultimodalForCausalLM": ("phi4mm", "Phi4MMForCausalLM", "Phi4MMProcessor"),
    "Phi4MMForCausalLM": ("phi4mm", "Phi4MMForCausalLM", "Phi4MMProcessor"),  # published
    "Phi3VForCausalLM": ("phi3v", "Phi3VForCausalLM", "Phi3VProcessor"),  # published only
    "QWenLMHeadModel": ("qwen_vl", "QwenVLForConditionalGeneration", "QwenVLProcessor"),
    "QwenVLForConditionalGeneration": (  # vLLM's name (the example's hf_overrides)
        "qwen_vl",
        "QwenVLForConditionalGeneration",
        "QwenVLProcessor",
    ),
    "H2OVLChatModel": ("h2ovl", "H2OVLChatModel", "H2OVLProcessor"),  # published h2ovl_chat
    "InternVLChatModel": ("internvl_chat", "InternVLChatModel", "InternVLChatProcessor"),
}

# config.json model_type that transformers reads only with the folder's own code -> (module in
# vlmx.models, function: the raw config dict -> a transformers config). Never runs that code.
_CONFIG_READERS: dict[str, tuple[str, str]] = {
    "phi4mm": ("phi4mm_config", "read_published_config"),
    "phi3_v": ("phi3v_config", "read_published_config"),
    "qwen": ("qwen_vl_config", "read_published_config"),  # Qwen-VL(-Chat)
    "h2ovl_chat": ("h2ovl_config", "read_published_config"),
    "internvl_chat": ("internvl_chat_config", "read_published_config"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def _check(architecture: str) -> tuple[str, str, str]:
    if architecture not in _MODELS:
        raise ValueError(
            f"architecture {architecture!r} is not supported by vlmx; supported architectures: "
            f"{', '.join(supported_architectures())}"
        )
    return _MODELS[architecture]


def resolve_architecture(architectures: list[str] | None) -> str:
    """Pick the first supported architecture of a config's `architectures` list."""
    for name in architectures or []:
        if name in _MODELS:
            return name
    raise ValueError(
        f"checkpoint architectures {architectures} are not supported by vlmx; supported "
        f"architectures: {', '.join(supported_architectures())}"
    )


def config_reader(model_type: str | None):
    """The function that reads a config.json of this model_type, or None (transformers' own)."""
    if model_type not in _CONFIG_READERS:
        return None
    module, fn = _CONFIG_READERS[model_type]
    return getattr(importlib.import_module(f"vlmx.models.{module}"), fn)


def get_model_class(architecture: str) -> type:
    module, model_cls, _ = _check(architecture)
    return getattr(importlib.import_module(f"vlmx.models.{module}"), model_cls)


def get_processor_class(architecture: str) -> type:
    module, _, processor_cls = _check(architecture)
    return getattr(importlib.import_module(f"vlmx.models.{module}"), processor_cls)
