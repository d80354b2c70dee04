"""Several processes under torchrun: the process group from its environment, rank helpers, global-batch shares.

Training stays equivalent to one process: every rank draws the same global permutation (same seed), takes its
contiguous share of each global batch, and scales its loss by (local size x world size / global size), so that
DistributedDataParallel's gradient average equals the single-process mean over the global batch. torch's own
DistributedSampler would reorder and pad the data (repeating samples), which changes that mean.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes, and its rank on the node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """True when several processes work together."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """True on the process that writes shared outputs (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.active:
            dist.barrier()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world-th one from its rank on (each item on exactly one rank)."""
        return list(items[self.rank :: self.world])

    def unshard(self, mine: Sequence[T], total: int) -> list[T]:
        """The inverse of shard: all `total` items in their original order on every rank, gathered an item at a time."""
        if not self.active:
            return list(mine)
        merged: list[T] = []
        for i in range(math.ceil(total / self.world)):
            box: list[Any] = [None] * self.world
            dist.all_gather_object(box, mine[i] if i < len(mine) else None)
            merged.extend(box)
        return merged[:total]

    def share(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous part of a global batch and the loss weight that makes DDP's average the mean."""
        if not self.active:
            return idx, 1.0
        n = len(idx)
        bounds = [n * r // self.world for r in range(self.world + 1)]
        local = idx[bounds[self.rank] : bounds[self.rank + 1]]
        if len(local) == 0:  # a short last batch: take part in the gradient exchange with a zero-weight sample
            return idx[:1], 0.0
        return local, len(local) * self.world / n

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor over every rank (the tensor itself in one process)."""
        if self.active:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object on every rank (in-process only; nothing is stored)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = DistContext()


def _wants_cuda(device: str) -> bool:
    """True when the requested device will be a CUDA GPU."""
    device = device.lower()
    if device.startswith("cuda") or device == "gpu":
        return True
    return device == "auto" and torch.cuda.is_available()


def from_env(device: str = "auto", timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group that torchrun describes in the environment (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed; run without torchrun or install a full torch.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = _wants_cuda(device)
        if cuda:
            if not torch.cuda.is_available():
                raise InputError("device cuda was asked for under torchrun but torch sees no GPU; use --device cpu.")
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def device_for(ctx: DistContext, device: str) -> str:
    """The device string for this rank: its own GPU under torchrun, else the requested one."""
    if ctx.active and _wants_cuda(device) and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank % torch.cuda.device_count()}"
    return device


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group (after a final barrier)."""
    if ctx is not None and ctx.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
