"""Runs across processes and GPUs through torch.distributed, as torchrun starts them.

    torchrun --nproc_per_node 2 -m circuitlab explain --image photos/ --out runs/photos
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500 --nproc_per_node 8 \\
        -m circuitlab explain --image photos/ --out runs/photos --device cuda

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; nothing here is home-made beyond
reading them: the process group is torch's (``gloo`` on CPU, ``nccl`` on CUDA), multi-node
rendezvous is torchrun's own flags. Without torchrun every function is a no-op for one process.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_device(device: Optional[str]) -> Optional[str]:
    """``cuda`` means this process's own GPU (``cuda:LOCAL_RANK``) under torchrun."""
    if device == "cuda" and rank_and_world()[1] > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


@contextlib.contextmanager
def process_group(device: Optional[str] = None):
    """Join torchrun's process group for the ``with`` block (``nccl`` for a CUDA device,
    ``gloo`` otherwise); one process: nothing to join."""
    if rank_and_world()[1] == 1 or dist.is_initialized():
        yield
        return
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(local_device(device)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
        dist.barrier()      # leave together: a process gone early aborts gloo's peers
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (a no-op for one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def active() -> tuple[int, int]:
    """(rank, world) of the joined process group; (0, 1) when none is joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj) -> list:
    """Every process's ``obj``, in rank order (one process: ``[obj]``)."""
    if active()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the processes (one process: the value)."""
    if active()[1] == 1:
        return float(value.detach())
    t = value.detach().clone().reshape(1)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()
