"""`vlmxEngineProcessorConfig`: what a Ray Data processor over vlmx engines runs, and where.

Named as `ray.data.llm.vLLMEngineProcessorConfig` names its fields (`model_source`,
`engine_kwargs`, `concurrency`, `batch_size`, `accelerator_type`); this module imports no Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlmx.engine.engine_args import EngineArgs


@dataclass(frozen=True)
class vlmxEngineProcessorConfig:  # NOTE: spelled as ray.data.llm's vLLMEngineProcessorConfig
    """One vlmx engine (`vlmx.LLM`) per Ray actor, `concurrency` actors, over a Dataset.

    Each row is one request, read from its columns:

    - `messages_column` (default "messages"): an OpenAI chat conversation, with `image_url`
      (URL, path or data URL), `image` (also encoded bytes or a PIL image) and `text` parts;
    - otherwise `prompt_column` (default "prompt") and the images in `image_columns` (each holds
      one image or a list of them: a URL, path, data URL, encoded bytes, a PIL image, an array
      [H, W, 3] uint8, or a Hugging Face datasets image `{"bytes": ..., "path": ...}`). With
      `apply_chat_template` the prompt is the user's text and the images come before it in one
      user message; without, the prompt is sent as is and must hold the model's placeholders;
    - `sampling_params` (optional): a dict of `vlmx.SamplingParams` fields for this row, over
      the config's `sampling_params`.

    Results keep every input column and add `generated_text`, `num_input_tokens`,
    `num_generated_tokens`, `finish_reason` and `error` (None, or why this row did not run; its
    other result columns are then None). A bad row never fails the job nor the rest of its batch.
    """

    model_source: str = "demo"  # checkpoint folder, hub id, or "demo"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # vlmx.EngineArgs fields
    # Engines (actors): n, or (min, max) for an autoscaling pool.
    concurrency: int | tuple[int, int] = 1
    batch_size: int = 64  # rows handed to an engine at once
    accelerator_type: str | None = None  # e.g. "H100"; None: any
    num_gpus: float = 1.0  # per actor (engine); 0 runs the engines on the CPU
    num_cpus: float = 1.0  # per actor
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    image_columns: tuple[str, ...] = ("image",)
    apply_chat_template: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    sampling_params: dict[str, Any] | None = None  # None: the checkpoint's defaults
    # Ray remote options for the actors (e.g. {"runtime_env": ...}, "memory", "resources").
    ray_remote_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.image_columns, str):
            object.__setattr__(self, "image_columns", (self.image_columns,))
        object.__setattr__(self, "image_columns", tuple(self.image_columns))
        if isinstance(self.concurrency, list):
            object.__setattr__(self, "concurrency", tuple(self.concurrency))
        _check_concurrency(self.concurrency)
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(
                f"num_gpus and num_cpus must be >= 0, got {self.num_gpus} and {self.num_cpus}"
            )
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(self.engine_kwargs) - names)
        if "model" in self.engine_kwargs:
            unknown.append("model (give it as model_source)")
        if unknown:
            raise ValueError(
                f"engine_kwargs has unknown vlmx engine argument(s) {unknown}; use "
                f"vlmx.EngineArgs fields: {sorted(names - {'model'})}"
            )
        if self.sampling_params is not None:
            from vlmx.sampling_params import SamplingParams

            try:
                SamplingParams(**self.sampling_params)
            except TypeError as e:
                raise ValueError(f"sampling_params: {e}") from None

    @property
    def min_max_concurrency(self) -> tuple[int, int]:
        if isinstance(self.concurrency, int):
            return self.concurrency, self.concurrency
        return self.concurrency[0], self.concurrency[1]


def _check_concurrency(concurrency: Any) -> None:
    ok = isinstance(concurrency, int) and not isinstance(concurrency, bool) and concurrency >= 1
    if isinstance(concurrency, tuple | list) and len(concurrency) == 2:
        low, high = concurrency
        ok = all(isinstance(x, int) and x >= 1 for x in (low, high)) and low <= high
    if not ok:
        raise ValueError(
            f"concurrency must be a positive number of engines or a (min, max) pair with "
            f"1 <= min <= max, got {concurrency!r}"
        )


# NOTE: the same class under a Python-style (CapWords) name; `vlmxEngineProcessorConfig` mirrors
# ray.data.llm's `vLLMEngineProcessorConfig` for those who port a vLLM script.
VlmxEngineProcessorConfig = vlmxEngineProcessorConfig
