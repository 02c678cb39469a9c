"""Data parallelism for the passes that sum over a data set (the gradient pass, the retain
statistics): under `torchrun` every rank takes a disjoint slice of the batches (batch i goes to
rank i mod world size), sums locally, and the sums are all-reduced, so every rank ends with the
single-process result (up to the order of float additions).

A stage asks for it with a param (`gradients.nproc`): with nproc > 1 and not already under
torchrun, `relaunch` starts `python -m torch.distributed.run --standalone --nproc-per-node N -m
<stage>` and exits with its status; rank 0 writes the outputs.  Backend: NCCL when the ranks
have GPUs, gloo on CPU.  Launched by hand (`torchrun --nnodes ...`) the same code runs across
machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from unlearn.errors import UnlearnError

T = TypeVar("T")


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init(device: str) -> str:
    """Join the process group started by torchrun (a no-op outside it); returns this rank's
    device (`cuda:<LOCAL_RANK>` when `device` is a GPU)."""
    if not under_torchrun() or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return device


def my_slice(batches: Iterable[T]) -> Iterator[T]:
    """This rank's batches: every world_size-th, starting at its rank."""
    r, n = rank(), world_size()
    for i, batch in enumerate(batches):
        if i % n == r:
            yield batch


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (a no-op in one process)."""
    if not active():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def check_every_rank_has_data(local_count: int, what: str) -> None:
    """Every rank must have got a slice: more processes than batches is a one-line error on all
    ranks (they all reach this collective, so none waits forever)."""
    if not active():
        return
    counts = torch.zeros(world_size(), dtype=torch.float64)
    counts[rank()] = local_count
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    empty = int((counts == 0).sum())
    if empty:
        raise UnlearnError(f"{what}: {empty} of {world_size()} processes got no batch (more processes than batches); "
                           "lower gradients.nproc or gradients.batch_size")


def relaunch(module: str, nproc: int) -> int:
    """Run `python -m <module>` under torchrun with `nproc` local processes; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module, *sys.argv[1:]]
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    return subprocess.call(cmd, env=env)


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_nproc(nproc: int, batches: int, what: str) -> None:
    """Before launching: at least one batch per process."""
    if nproc < 1:
        raise UnlearnError(f"params.yaml gradients.nproc is {nproc}; it must be >= 1 (1: one process)")
    n = int(os.environ.get("WORLD_SIZE", nproc)) if under_torchrun() else nproc
    if n > batches:
        raise UnlearnError(f"{n} processes but {what} has only {batches} batches (more processes than slices); "
                           "lower gradients.nproc or gradients.batch_size")
