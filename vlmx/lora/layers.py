"""LoRA on a model's linear layers: per-layer slot weights, and the hook that adds each token's
adapter to the layer's output.

Each adaptable layer (`LoRATarget`) gets slot buffers `A [max_loras, num_parts * R, in]`,
`B [max_loras, out, R]` (R = max_lora_rank; zero where an adapter does not reach) and a forward
hook. The hooks of one model share a `LoRABatch`, which says what the current forward applies:

```
nothing        (no token of the step has an adapter; also the default)
tokens         the decoder's step: LoRATokenGroups (tokens grouped by slot)
uniform slot   one adapter on every row (the vision encoder's images of one adapter)
```
The runner sets it around each forward through `LoRABatch.applying`, which refuses nesting.
On CUDA the token groups live in persistent buffers that captured decode graphs read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vlmx.lora.targets import LoRATarget
from vlmx.ops.lora import LoRATokenGroups, lora_apply_dense, lora_apply_torch, lora_apply_triton


class LoRABatch:
    """What the LoRA hooks apply during the current forward (see the module docstring)."""

    def __init__(self, use_triton: bool) -> None:
        self.use_triton = use_triton
        self.groups: LoRATokenGroups | None = None
        self.uniform_slot: int | None = None
        self._busy = False

    @contextlib.contextmanager
    def applying(
        self, groups: LoRATokenGroups | None = None, uniform_slot: int | None = None
    ) -> Iterator[None]:
        assert not self._busy, "LoRABatch.applying does not nest"
        assert groups is None or uniform_slot is None
        self._busy, self.groups, self.uniform_slot = True, groups, uniform_slot
        try:
            yield
        finally:
            self._busy, self.groups, self.uniform_slot = False, None, None


class LoRASlots:
    """One layer's slot weights, and the forward hook that applies them (kept out of the
    model's parameters: the checkpoint knows nothing of them)."""

    def __init__(
        self, target: LoRATarget, max_loras: int, rank: int, batch: LoRABatch, dtype, device
    ) -> None:
        self.target = target
        self.batch = batch
        num_parts = len(target.slices)
        self.a = torch.zeros(
            max_loras, num_parts * rank, target.padded_in, dtype=dtype, device=device
        )
        self.b = torch.zeros(max_loras, target.out_features, rank, dtype=dtype, device=device)
        self.slice_table = torch.tensor(target.slices, dtype=torch.int32, device=device)

    @property
    def rank(self) -> int:
        return self.b.shape[-1]

    def load(self, slot: int, parts: list[tuple[int | None, torch.Tensor, torch.Tensor]]) -> None:
        """Fill `slot` with an adapter's parts of this layer: (part, A [r, in], scale * B
        [rows, r]); part None covers every part (B's rows split across them)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        rank, slices = self.rank, self.target.slices
        for part, a, b in parts:
            r, n_in = a.shape
            indexes = range(len(slices)) if part is None else [part]
            row = 0
            for i in indexes:
                offset, size = slices[i]
                self.a[slot, i * rank : i * rank + r, :n_in].copy_(a)
                src = b if part is not None else b[row : row + size]
                self.b[slot, offset : offset + size, :r].copy_(src)
                row += size

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        x = args[0]
        if batch.uniform_slot is not None:
            slot = batch.uniform_slot
            lora_apply_dense(x, output, self.a[slot], self.b[slot], self.target.slices)
        elif batch.groups is not None:
            if batch.use_triton:
                lora_apply_triton(
                    x, output, self.a, self.b, self.target.slices, self.slice_table, batch.groups
                )
            else:
                lora_apply_torch(
                    x, output, self.a, self.b, self.target.slices, batch.groups.rows_by_slot
                )
        return output
