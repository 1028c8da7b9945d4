"""vlmx.distributed.state: a group of one is the identity; two gloo ranks sum and gather."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from vlmx.distributed import state


def test_a_group_of_one_is_the_identity() -> None:
    x = torch.arange(4.0)
    assert state.tp_rank() == 0 and state.tp_size() == 1
    assert state.all_reduce(x) is x and state.all_gather(x) is x
    assert state.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="rank 2 is not in a group of 2"):
        state.init_tensor_parallel(2, 2, "gloo", "tcp://127.0.0.1:1")


def _rank(rank: int, size: int, init_method: str, results) -> None:
    state.init_tensor_parallel(rank, size, "gloo", init_method)
    try:
        with pytest.raises(RuntimeError, match="already rank"):
            state.init_tensor_parallel(rank, size, "gloo", init_method)
        summed = state.all_reduce(torch.full((3,), float(rank + 1)))
        gathered = state.all_gather(torch.tensor([[rank]]), dim=1)
        obj = state.broadcast_object({"from": rank} if rank == 0 else None)
        results.put((rank, summed.tolist(), gathered.tolist(), obj))
    finally:
        state.destroy_tensor_parallel()


def test_two_gloo_ranks_reduce_gather_and_broadcast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(r, 2, f"tcp://127.0.0.1:{port}", results)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got == [
        (0, [3.0, 3.0, 3.0], [[0, 1]], {"from": 0}),
        (1, [3.0, 3.0, 3.0], [[0, 1]], {"from": 0}),
    ]
