"""`EngineArgs` (vLLM's argument names and defaults) and how they become an `EngineConfig`: find
the checkpoint, read its config, check every argument once.

It sits above `vlmx.config` (the frozen configs) and `vlmx.models`, and nothing below imports it,
so the import graph has no cycle.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from vlmx.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    parse_device,
    parse_dtype,
)
from vlmx.models.loader import load_hf_config, resolve_model_path, text_config
from vlmx.models.registry import resolve_architecture
from vlmx.multimodal.media import MediaLimits

logger = logging.getLogger(__name__)

# Token budget of one step when none is given: on CUDA 16384, as vLLM's offline LLM takes on
# large GPUs (fewer, larger prefill steps: w1-multi 32.3 -> 36.7 images/s on an H200); 8192 on
# the CPU.
_DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 16384, "cpu": 8192}
# Largest image the encoder cache must hold by default: Qwen2-VL's default max_pixels
# (12845056) is 16384 merged tokens.
_DEFAULT_ENCODER_CACHE_SIZE = 16384


@dataclass
class EngineArgs:
    """The arguments of `vlmx.LLM`, named and defaulted as vLLM names them.

    A field vlmx does not support yet raises a `ValueError` when the engine is built, never
    silently ignored.
    """

    model: str = "demo"
    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer_revision: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"  # "auto": the checkpoint's safetensors; "dummy": random weights
    seed: int | None = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    # GiB of device memory for the processed images (encoder inputs) of the requests in the
    # engine, which vlmx preprocesses on the device; kept out of the KV cache's share, and no
    # more requests are taken in by `LLM` while they hold it. None: 5% of the device's memory.
    mm_input_gb: float | None = None
    enable_prefix_caching: bool = True
    limit_mm_per_prompt: dict[str, int] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    hf_overrides: dict[str, Any] | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enforce_eager: bool = False
    # Schedule and launch each step before the previous one's samples reach the host, so the
    # host's bookkeeping overlaps the GPU (None: on for CUDA, off elsewhere).
    async_scheduling: bool | None = None
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 1  # adapters on the device at once (distinct adapters of one step)
    max_cpu_loras: int | None = None  # adapters kept in host memory (None: max_loras)
    enable_tower_connector_lora: bool = False  # adapters may target the tower and projector
    max_logprobs: int = 20
    device: str = "auto"
    disable_log_stats: bool = True

    # Limits on one image (None: the VLMX_IMAGE_* variable, else the default): seconds of one
    # http(s) download (10), bytes of one encoded image (64 MiB), width * height (64 Mi).
    image_fetch_timeout: float | None = None
    image_max_bytes: int | None = None
    image_max_pixels: int | None = None

    def create_engine_config(self) -> EngineConfig:
        """The frozen `EngineConfig`: finds or downloads the checkpoint, resolves the
        architecture, fills in defaults; raises ValueError for unsupported or bad values."""
        return build_engine_config(self)


# EngineArgs field -> (MediaLimits field, what it holds, the variable read when it is None)
_MEDIA_LIMIT_ARGS = {
    "image_fetch_timeout": ("timeout_s", "number of seconds", "VLMX_IMAGE_FETCH_TIMEOUT"),
    "image_max_bytes": ("max_bytes", "integer", "VLMX_IMAGE_MAX_BYTES"),
    "image_max_pixels": ("max_pixels", "integer", "VLMX_IMAGE_MAX_PIXELS"),
}


def media_limits(args: EngineArgs) -> MediaLimits:
    """The image limits of `args`: each field that is set, else its variable, else the default."""
    given: dict[str, Any] = {}
    for name, (limit, kind, variable) in _MEDIA_LIMIT_ARGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and value > 0) or (
            kind == "integer" and value != int(value)
        ):
            raise ValueError(
                f"{name} must be a positive {kind}, got {value!r} (None: the {variable} "
                "variable, else the default)"
            )
        given[limit] = float(value) if kind != "integer" else int(value)
    return MediaLimits.from_env(**given)


def _unsupported(args: EngineArgs) -> list[str]:
    problems = []
    if args.tensor_parallel_size != 1:
        problems.append(
            f"tensor_parallel_size={args.tensor_parallel_size} (vlmx runs on one GPU for now; "
            "use tensor_parallel_size=1)"
        )
    if args.pipeline_parallel_size != 1:
        problems.append(f"pipeline_parallel_size={args.pipeline_parallel_size} (use 1)")
    if args.load_format not in ("auto", "safetensors", "dummy"):
        problems.append(f"load_format={args.load_format!r} (use 'auto', 'safetensors' or 'dummy')")
    if args.tokenizer_mode not in ("auto", "hf", "slow"):
        problems.append(f"tokenizer_mode={args.tokenizer_mode!r} (use 'auto', 'hf' or 'slow')")
    return problems


def _check_args(args: EngineArgs) -> dict[str, int]:
    """Raise for an unsupported or out-of-range argument; return `limit_mm_per_prompt`."""
    problems = _unsupported(args)
    if problems:
        raise ValueError("vlmx does not support " + "; ".join(problems))
    for name in ("max_num_seqs", "block_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.mm_input_gb is not None and not args.mm_input_gb >= 0:
        raise ValueError(f"mm_input_gb must be >= 0 (GiB) or None, got {args.mm_input_gb}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError(
            f"gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}"
        )
    limits = dict(args.limit_mm_per_prompt or {})
    unknown = set(limits) - {"image"}
    if unknown:
        raise ValueError(
            f"limit_mm_per_prompt has {sorted(unknown)}: vlmx takes image inputs only, "
            "so only the 'image' key is accepted"
        )
    return limits


def _checkpoint_paths(args: EngineArgs) -> tuple[str, str]:
    """(model folder, tokenizer folder): local, downloaded, or the built-in demo."""
    if args.model == "demo":
        from vlmx.demo.checkpoint import demo_model_path

        model_path = demo_model_path()
    else:
        model_path = resolve_model_path(args.model, args.revision)
    if args.tokenizer is None or args.tokenizer == args.model:
        return model_path, model_path
    return model_path, resolve_model_path(args.tokenizer, args.tokenizer_revision)


def build_engine_config(args: EngineArgs) -> EngineConfig:
    limits = _check_args(args)
    image_limits = media_limits(args)
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    model_path, tokenizer_path = _checkpoint_paths(args)
    hf_config = load_hf_config(model_path, args.hf_overrides, args.trust_remote_code)
    architecture = resolve_architecture(getattr(hf_config, "architectures", None))

    model_max = getattr(text_config(hf_config), "max_position_embeddings", None)
    max_model_len = args.max_model_len or model_max or 4096
    if model_max and max_model_len > model_max:
        logger.warning(
            "max_model_len=%d exceeds the model's max_position_embeddings=%d",
            max_model_len,
            model_max,
        )
    default_batched = _DEFAULT_MAX_NUM_BATCHED_TOKENS.get(device.type, 8192)
    max_batched = args.max_num_batched_tokens or max(default_batched, min(max_model_len, 16384))
    if max_batched < args.max_num_seqs:
        raise ValueError(
            f"max_num_batched_tokens={max_batched} is below max_num_seqs={args.max_num_seqs}; "
            "each running sequence needs a token per step"
        )
    encoder_cache_size = max(max_batched, _DEFAULT_ENCODER_CACHE_SIZE)

    model_config = ModelConfig(
        model=args.model,
        model_path=model_path,
        tokenizer_path=tokenizer_path,
        tokenizer_mode=args.tokenizer_mode,
        trust_remote_code=args.trust_remote_code,
        hf_config=hf_config,
        architecture=architecture,
        dtype=dtype,
        max_model_len=max_model_len,
        load_format=args.load_format,
        mm_processor_kwargs=dict(args.mm_processor_kwargs or {}),
        max_images_per_prompt=limits.get("image"),
        media_limits=image_limits,
    )
    cache_config = CacheConfig(
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        enable_prefix_caching=args.enable_prefix_caching,
        mm_input_bytes=None if args.mm_input_gb is None else int(args.mm_input_gb * 2**30),
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max_batched,
        max_model_len=max_model_len,
        encoder_cache_size=encoder_cache_size,
        encoder_budget=encoder_cache_size,
    )
    return EngineConfig(
        model_config=model_config,
        cache_config=cache_config,
        scheduler_config=scheduler_config,
        device=device,
        seed=args.seed,
        max_logprobs=args.max_logprobs,
        enforce_eager=args.enforce_eager,
        async_scheduling=(
            device.type == "cuda" if args.async_scheduling is None else args.async_scheduling
        ),
        lora_config=_lora_config(args),
    )


def _lora_config(args: EngineArgs) -> LoRAConfig | None:
    if not args.enable_lora:
        return None
    return LoRAConfig(
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_loras if args.max_cpu_loras is None else args.max_cpu_loras,
        enable_tower_connector_lora=args.enable_tower_connector_lora,
    )


def engine_args_from_kwargs(model: str, **kwargs) -> EngineArgs:
    """EngineArgs from `LLM(model, **kwargs)`; an unknown keyword raises naming the known ones."""
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(
            f"unknown engine argument(s) {unknown}; vlmx.EngineArgs accepts: {sorted(names)}"
        )
    return EngineArgs(model=model, **kwargs)
