"""One device's worker: builds the model, sizes and allocates its KV cache, runs steps.

The engine reaches it only through an `Executor` (`worker/executor.py`) and only with step
records (`vlmx.step`); it holds the worker-side state of every request itself.
"""

from __future__ import annotations

import logging
import math

import torch

from vlmx.config import MM_INPUT_SHARE, EngineConfig
from vlmx.models.interface import Model
from vlmx.models.loader import build_model
from vlmx.step import RunnerOutput, SchedulerOutput
from vlmx.worker.model_runner import ModelRunner, PendingStep

logger = logging.getLogger(__name__)

_CPU_KV_BYTES = 4 << 30  # KV cache budget on the CPU, where nothing to profile exists


def kv_blocks_for_budget(
    total_bytes: float,
    utilization: float,
    peak_bytes: int,
    reserved_bytes: int,
    bytes_per_block: int,
) -> int:
    """KV blocks that fit: `utilization` of the device's memory, less the profiled peak of the
    largest step (weights included) and the memory reserved for what lives between steps
    (preprocessed images), in blocks of `bytes_per_block`.

    ```
    |<---------------------- total * gpu_memory_utilization ---------------------->|
    | weights | largest step (encoder, decoder) | images (reserved) | KV blocks ... |
    |<------------- peak_bytes -------------->|
    ```
    """
    budget = total_bytes * utilization - peak_bytes - reserved_bytes
    return max(0, int(budget // bytes_per_block))


class Worker:
    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int]) -> None:
        self.config = config
        mc = config.model_config
        if config.seed is not None:  # unseeded requests draw from torch's global generator
            torch.manual_seed(config.seed)
        self.model: Model = build_model(
            mc.architecture, mc.hf_config, mc.model_path, config.device, mc.dtype, mc.load_format
        )
        self.runner = ModelRunner(self.model, config, eos_token_ids)
        # Device bytes the engine's requests may hold in encoder inputs (None: no bound).
        self.mm_input_bytes = config.cache_config.mm_input_bytes
        if self.mm_input_bytes is None and config.device.type == "cuda":
            total = torch.cuda.mem_get_info(config.device)[1]
            self.mm_input_bytes = int(total * MM_INPUT_SHARE)

    def determine_num_blocks(self) -> int:
        """KV blocks for this device: `num_gpu_blocks_override`, else on CUDA what
        `gpu_memory_utilization` leaves after the profiled peak, on the CPU a fixed budget;
        never more than `max_num_seqs` full-length sequences need."""
        cache, sched = self.config.cache_config, self.config.scheduler_config
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        block_size = cache.block_size
        per_block = self.runner.bytes_per_block()
        blocks_per_seq = math.ceil(sched.max_model_len / block_size)
        wanted = sched.max_num_seqs * blocks_per_seq
        if self.config.device.type != "cuda":
            return max(blocks_per_seq, min(wanted, _CPU_KV_BYTES // per_block))
        _, total = torch.cuda.mem_get_info(self.config.device)
        peak = self.profile_peak_memory()
        if self.runner.lora is not None:
            logger.info(
                "LoRA slots: %.2f GiB (in the profiled peak)", self.runner.lora.num_bytes / 2**30
            )
        reserved = (self.mm_input_bytes or 0) + cache.processor_cache_bytes
        num_blocks = kv_blocks_for_budget(
            total, cache.gpu_memory_utilization, peak, reserved, per_block
        )
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache fits {num_blocks} blocks of {block_size} tokens but one "
                f"sequence of max_model_len={sched.max_model_len} needs {blocks_per_seq}; "
                "raise gpu_memory_utilization or lower max_model_len"
            )
        logger.info("KV cache: %d blocks (%.1f GiB)", num_blocks, num_blocks * per_block / 2**30)
        return min(num_blocks, wanted)

    def profile_peak_memory(self) -> int:
        """Peak device bytes (weights included) of the largest step (`ModelRunner.profile_run`)."""
        device = self.config.device
        torch.cuda.reset_peak_memory_stats(device)
        self.runner.profile_run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()
        return peak

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)
        self.runner.warm_up()

    def launch(self, step: SchedulerOutput) -> PendingStep:
        return self.runner.launch(step)

    def collect(self, pending: PendingStep) -> RunnerOutput:
        return self.runner.collect(pending)

    def reset_encoder_cache(self) -> None:
        self.runner.encoder.clear()
