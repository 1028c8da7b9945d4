"""The tensor-parallel group of this process, and the collectives the parallel layers call.

A worker process joins its group once, before it builds the model (`init_tensor_parallel`), and
leaves it at shutdown (`destroy_tensor_parallel`). Until then the process is rank 0 of a group
of one and every collective returns its input, so a TP=1 engine and the tests that build layers
directly never touch `torch.distributed`.

```
LLM(tensor_parallel_size=2)
  worker 0: init_tensor_parallel(0, 2, ...) -> build model (its shard) -> steps ... -> destroy
  worker 1: init_tensor_parallel(1, 2, ...) -> build model (its shard) -> steps ... -> destroy
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(slots=True, frozen=True)
class TensorParallel:
    rank: int
    size: int
    group: dist.ProcessGroup | None  # None: a group of one


_SINGLE = TensorParallel(0, 1, None)
_state: TensorParallel = _SINGLE


def init_tensor_parallel(rank: int, size: int, backend: str, init_method: str) -> TensorParallel:
    """Join the group of `size` ranks (`backend` "nccl" on CUDA, "gloo" on the CPU) as `rank`;
    refuses a second join in one process (leave with `destroy_tensor_parallel` first)."""
    global _state
    if _state.size > 1:
        raise RuntimeError(
            f"this process is already rank {_state.rank} of a tensor-parallel group of "
            f"{_state.size}; destroy_tensor_parallel() before joining another"
        )
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a group of {size}")
    if size == 1:
        return _state
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    _state = TensorParallel(rank, size, dist.group.WORLD)
    return _state


def destroy_tensor_parallel() -> None:
    global _state
    if _state.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _state = _SINGLE


def tensor_parallel() -> TensorParallel:
    return _state


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the ranks (in place where the backend allows); `x` itself at size 1."""
    if _state.size == 1:
        return x
    dist.all_reduce(x, group=_state.group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' `x` concatenated along `dim` in rank order; `x` itself at size 1."""
    if _state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x.contiguous(), group=_state.group)
    return torch.cat(parts, dim=dim)


def broadcast_object(obj: object | None, src: int = 0) -> object:
    """`obj` of rank `src` on every rank (pickled); `obj` itself at size 1."""
    if _state.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_state.group)
    return box[0]
