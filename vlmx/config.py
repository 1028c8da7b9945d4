"""The engine's frozen configs, built once from `EngineArgs` (`vlmx.engine.engine_args`) and read
by every part of the engine; this module imports nothing of vlmx above `multimodal.media`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig

from vlmx.multimodal.media import MediaLimits

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
}


@dataclass(frozen=True)
class ModelConfig:
    model: str  # as the user gave it (folder or hub id)
    model_path: str  # local folder holding config.json and the weights
    tokenizer_path: str
    tokenizer_mode: str
    trust_remote_code: bool
    hf_config: PretrainedConfig
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    load_format: str = "auto"
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    max_images_per_prompt: int | None = None  # limit_mm_per_prompt["image"]
    media_limits: MediaLimits = MediaLimits()  # image_fetch_timeout, image_max_bytes, ...


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    num_gpu_blocks_override: int | None
    enable_prefix_caching: bool
    # Device bytes for the encoder inputs of the requests in the engine (None: a share of the
    # device's memory, `MM_INPUT_SHARE`), and for the processor's cache of preprocessed images;
    # both are kept out of the KV cache's budget.
    mm_input_bytes: int | None = None
    processor_cache_bytes: int = 512 << 20


MM_INPUT_SHARE = 0.05  # of the device's memory, when mm_input_bytes is None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int  # token budget of one step
    max_model_len: int
    encoder_cache_size: int  # embeddings the encoder cache holds
    encoder_budget: int  # embeddings the encoder may compute in one step


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (`enable_lora=True`): how many the device holds at once (`max_loras`, the
    distinct adapters of one step), the host (`max_cpu_loras`), the largest rank, and whether
    adapters may target the vision tower and the projector."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1
    enable_tower_connector_lora: bool = False

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras={self.max_cpu_loras} must be >= max_loras={self.max_loras}"
            )


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device: torch.device
    seed: int | None
    max_logprobs: int
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    async_scheduling: bool = False
    lora_config: LoRAConfig | None = None  # None: enable_lora=False


def parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of 'auto', {', '.join(map(repr, _DTYPES))}")
    return _DTYPES[dtype]


def parse_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(
            f"device={device!r} is not a torch device ('cpu', 'cuda', 'cuda:1')"
        ) from e
