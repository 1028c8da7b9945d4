"""The worker's adapters: read from disk on first use, kept on the host (`max_cpu_loras`, least
recently used dropped) and in the device's slots (`max_loras`, least recently used replaced).

```
LoRARequest(path) --load (plan_adapter + tensors)--> host cache --> slot s of every layer
step: requests' adapters -> slots -> tokens grouped by slot (LoRATokenGroups) -> the hooks
```
The scheduler never puts more than `max_loras` distinct adapters in one step, so a step's
adapters all have slots at once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vlmx.config import LoRAConfig
from vlmx.lora.adapter import load_adapter_tensors
from vlmx.lora.layers import LoRABatch, LoRASlots
from vlmx.lora.request import LoRARequest
from vlmx.lora.targets import AdapterPlan, find_targets, plan_adapter
from vlmx.ops.lora import LoRATokenGroups, group_tokens
from vlmx.ops.triton_support import triton_available

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class HostAdapter:
    plan: AdapterPlan
    # layer -> [(part, A [r, in], scale * B [rows, r])] in the model's dtype, on the CPU
    layers: dict[str, list[tuple[int | None, torch.Tensor, torch.Tensor]]]


class LoRAManager:
    """Slot weights and hooks on `model`'s adaptable layers, and the adapters in them."""

    def __init__(
        self, model: nn.Module, config: LoRAConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.targets = find_targets(model)
        self.batch = LoRABatch(use_triton=device.type == "cuda" and triton_available(device))
        self.layers: dict[str, LoRASlots] = {}
        for name, target in self.targets.items():
            if target.tower and not config.enable_tower_connector_lora:
                continue
            slots = LoRASlots(
                target, config.max_loras, config.max_lora_rank, self.batch, dtype, device
            )
            model.get_submodule(name).register_forward_hook(slots.hook)
            self.layers[name] = slots
        self.host: OrderedDict[int, HostAdapter] = OrderedDict()  # least recently used first
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, LRU first
        self.tower_ids: set[int] = set()  # adapters in a slot that reach the tower
        self.free_slots = list(range(config.max_loras - 1, -1, -1))

    @property
    def num_bytes(self) -> int:
        """Device bytes of the slot weights."""
        return sum(s.a.nbytes + s.b.nbytes for s in self.layers.values())

    # -- adapters -------------------------------------------------------------------------

    def _host_adapter(self, request: LoRARequest) -> HostAdapter:
        adapter = self.host.get(request.lora_int_id)
        if adapter is not None:
            self.host.move_to_end(request.lora_int_id)
            return adapter
        plan = plan_adapter(
            self.model, self.targets, request.lora_int_id, request.lora_path, self.config
        )
        tensors = load_adapter_tensors(request.lora_path)
        layers: dict[str, list] = {}
        for p in plan.parts:
            a = tensors[p.a_key].to(self.dtype)
            b = (tensors[p.b_key].double() * p.scale).to(self.dtype)
            layers.setdefault(p.target, []).append((p.part, a, b))
        adapter = HostAdapter(plan, layers)
        self.host[request.lora_int_id] = adapter
        while len(self.host) > self.config.max_cpu_loras:
            lora_id, _ = self.host.popitem(last=False)
            logger.info("LoRA %d dropped from the host cache", lora_id)
        return adapter

    def slots_for(self, requests: list[LoRARequest | None]) -> list[int]:
        """The slot of each request's adapter (-1: the base model), loading adapters that have
        none; the slots of adapters this step does not use are reused least recently used
        first."""
        wanted = {r.lora_int_id: r for r in requests if r is not None}
        assert len(wanted) <= self.config.max_loras, (len(wanted), self.config.max_loras)
        for lora_id in wanted:
            if lora_id in self.slot_of:
                self.slot_of.move_to_end(lora_id)
        for lora_id, request in wanted.items():
            if lora_id not in self.slot_of:
                self._load_slot(request, set(wanted))
        return [-1 if r is None else self.slot_of[r.lora_int_id] for r in requests]

    def _load_slot(self, request: LoRARequest, in_use: set[int]) -> None:
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            victim = next(i for i in self.slot_of if i not in in_use)
            slot = self.slot_of.pop(victim)
            self.tower_ids.discard(victim)
            logger.info("LoRA %d leaves slot %d", victim, slot)
        adapter = self._host_adapter(request)
        for name, layer in self.layers.items():
            layer.load(slot, adapter.layers.get(name, []))
        self.slot_of[request.lora_int_id] = slot
        if adapter.plan.uses_tower:
            self.tower_ids.add(request.lora_int_id)

    def uses_tower(self, request: LoRARequest | None) -> bool:
        """Whether the request's adapter (in a slot) reaches the tower or projector."""
        return request is not None and request.lora_int_id in self.tower_ids

    # -- a step's tokens ------------------------------------------------------------------

    def allocate_token_buffers(self, max_tokens: int) -> None:
        """CUDA: the persistent buffers every step's token groups are copied into, so that
        captured decode graphs read each replay's groups."""
        n, device = self.config.max_loras, self.device
        self.buffers = LoRATokenGroups(
            token_idx=torch.zeros(max_tokens, dtype=torch.int32, device=device),
            starts=torch.zeros(n, dtype=torch.int32, device=device),
            counts=torch.zeros(n, dtype=torch.int32, device=device),
        )

    def token_groups(self, token_slots: np.ndarray, stage=None) -> LoRATokenGroups | None:
        """Tokens grouped by slot ([T] slot per token, -1 = none); None when no token has an
        adapter. With `stage` (CUDA: array, dtype -> pinned host tensor) the groups are copied
        into the persistent buffers (`allocate_token_buffers`), whose counts are zero past
        them."""
        order, starts, counts = group_tokens(token_slots, self.config.max_loras)
        if order.size == 0:
            if stage is not None:
                self.buffers.counts.zero_()  # decode graphs read the buffers regardless
            return None
        if stage is not None:
            buf = self.buffers
            for dst, array in ((buf.token_idx[: order.size], order), (buf.starts, starts),
                               (buf.counts, counts)):  # fmt: skip
                dst.copy_(stage(array, torch.int32), non_blocking=True)
            return buf
        rows = torch.from_numpy(order.astype(np.int64)).to(self.device)
        return LoRATokenGroups(
            token_idx=rows.to(torch.int32),
            starts=torch.from_numpy(starts.astype(np.int32)).to(self.device),
            counts=torch.from_numpy(counts.astype(np.int32)).to(self.device),
            rows_by_slot=[
                (s, rows[starts[s] : starts[s] + counts[s]])
                for s in np.flatnonzero(counts).tolist()
            ],
        )
