"""codetr.core.dist under a real 2-process gloo group on the CPU."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codetr.core.dist import get_rank, get_world_size, is_main_process, reduce_mean


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = torch.tensor([float(rank + 1), 10.0 * rank])   # rank 0: [1, 0], rank 1: [2, 10]
        out[rank] = (get_rank(), get_world_size(), is_main_process(), reduce_mean(x).tolist(), x.tolist())
    finally:
        dist.destroy_process_group()


def test_reduce_mean_two_processes():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        res = dict(out)
    assert res[0][:3] == (0, 2, True) and res[1][:3] == (1, 2, False)
    for r in (0, 1):
        assert res[r][3] == [1.5, 5.0]          # the mean over ranks, on every rank
    assert res[1][4] == [2.0, 10.0]              # the input is not modified in place


def test_single_process_is_identity():
    x = torch.tensor([4.0, 5.0], requires_grad=True)
    y = reduce_mean(x)
    assert torch.equal(y, x.detach()) and not y.requires_grad
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
