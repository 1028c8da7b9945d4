"""The engine's check of each `LoRARequest` before its request is queued, so that a bad adapter
fails that request alone, with a message naming the problem.

The check needs the model's layer names and shapes, not its weights: it builds the family's
model once on the meta device (no memory) and maps each adapter onto it (`plan_adapter`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from transformers import PretrainedConfig

from vlmx.config import LoRAConfig
from vlmx.lora.request import LoRARequest
from vlmx.lora.targets import AdapterPlan, find_targets, plan_adapter
from vlmx.models.registry import get_model_class

_MAX_PLANS = 1024  # adapters whose checked plans the engine remembers


class LoRAChecker:
    def __init__(self, architecture: str, hf_config: PretrainedConfig, config: LoRAConfig) -> None:
        self.config = config
        with torch.device("meta"):
            self.model = get_model_class(architecture)(hf_config)
        self.targets = find_targets(self.model)
        self.plans: OrderedDict[int, AdapterPlan] = OrderedDict()

    def check(self, request: LoRARequest) -> AdapterPlan:
        """The adapter's plan; ValueError if vlmx cannot apply it to this model."""
        plan = self.plans.get(request.lora_int_id)
        if plan is not None:
            if plan.path != request.lora_path:
                raise ValueError(
                    f"lora_int_id {request.lora_int_id} names {plan.path!r} already; "
                    f"give {request.lora_path!r} an id of its own"
                )
            self.plans.move_to_end(request.lora_int_id)
            return plan
        plan = plan_adapter(
            self.model, self.targets, request.lora_int_id, request.lora_path, self.config
        )
        self.plans[request.lora_int_id] = plan
        if len(self.plans) > _MAX_PLANS:
            self.plans.popitem(last=False)
        return plan
