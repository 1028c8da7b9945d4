"""LoRARequest, named as vLLM names it. Adapters themselves are not supported yet."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")


LORA_UNSUPPORTED = (
    "LoRA adapters are not supported by vlmx yet; run without lora_request / enable_lora"
)
