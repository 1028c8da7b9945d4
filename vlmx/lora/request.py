"""LoRARequest, named as vLLM names it: which adapter (a PEFT folder) a request runs with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """`lora_int_id` identifies the adapter everywhere (slots, caches, prefix-cache keys): two
    requests with the same id must name the same folder."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")


LORA_DISABLED = (
    "a lora_request was given but the engine was built with enable_lora=False; "
    "build it with enable_lora=True (and max_lora_rank >= the adapter's rank)"
)
