"""How the engine runs steps on its workers: `Executor`, and the in-process implementation.

The engine hands an executor a step record and gets the samples back; it never sees a worker.
An executor with one worker process per tensor-parallel rank implements the same interface.
"""

from __future__ import annotations

import abc

from vlmx.config import EngineConfig
from vlmx.step import RunnerOutput, SchedulerOutput
from vlmx.worker.worker import Worker


class Executor(abc.ABC):
    """Runs step records on the workers. `launch` queues a step and returns a handle without
    waiting; `collect` waits for that step's samples. A second step may be launched before the
    first is collected (async scheduling); steps are collected in launch order."""

    num_blocks: int  # KV blocks every worker holds (the scheduler's pool size)
    cuda_graphs: bool  # decode steps replay CUDA graphs
    # Device bytes the engine's requests may hold in encoder inputs, kept out of the KV cache
    # (None: no bound, on the CPU)
    mm_input_bytes: int | None
    # Cross-attention models: images whose K/V the workers hold at once (the scheduler admits
    # requests within it); None: the model has no cross-attention
    cross_attention_images: int | None = None

    @abc.abstractmethod
    def launch(self, step: SchedulerOutput) -> object: ...

    @abc.abstractmethod
    def collect(self, handle: object) -> RunnerOutput: ...

    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its samples."""
        return self.collect(self.launch(step))

    @abc.abstractmethod
    def reset_encoder_cache(self) -> None:
        """Drop every cached encoder output (the scheduler's encoder cache is cleared too)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release the workers; the executor is not used after it."""


class InProcessExecutor(Executor):
    """One worker, in the engine's process and thread."""

    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int]) -> None:
        self.worker = Worker(config, eos_token_ids)
        self.num_blocks = self.worker.determine_num_blocks()
        self.worker.initialize_kv_cache(self.num_blocks)
        self.cuda_graphs = self.runner.graphs is not None
        self.mm_input_bytes = self.worker.mm_input_bytes
        self.cross_attention_images = self.worker.cross_attention_images

    @property
    def runner(self):
        return self.worker.runner

    def launch(self, step: SchedulerOutput) -> object:
        return self.worker.launch(step)

    def collect(self, handle: object) -> RunnerOutput:
        return self.worker.collect(handle)

    def reset_encoder_cache(self) -> None:
        self.worker.reset_encoder_cache()

    def shutdown(self) -> None:
        """Nothing to release: the worker lives and dies with this object."""
