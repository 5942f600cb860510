"""Everything that talks to other processes: rank and world, the gather the stage-1 losses need, sums and
object gathers for evaluation and validation, and the `WorkShare` handed to the model library.

Works unchanged with one process (no process group): every function is then the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from qformer.workshare import WorkShare


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world) for a `torchrun` launch (gloo on CPU, nccl on CUDA); (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return world()


def device_for(name: str, rank: int) -> torch.device:
    """The device a command asked for, checked: one GPU per process under torchrun."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", rank % torch.cuda.device_count())
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None


def reduce_sum(x: Tensor) -> Tensor:
    """The sum of `x` over all processes (in place)."""
    if world()[1] > 1:
        dist.all_reduce(x)
    return x


def current_share() -> WorkShare:
    """This process's share of a job split over every process of the group."""
    rank, size = world()
    return WorkShare(rank, size, reduce_sum)


def gather_objects(value) -> list:
    """Every process's `value` (any picklable object), in rank order."""
    size = world()[1]
    if size == 1:
        return [value]
    parts = [None] * size
    dist.all_gather_object(parts, value)
    return parts


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (one all_reduce).

    Written out rather than using torch.distributed.nn.functional.all_gather, whose all-to-all
    backward mixes up non-contiguous gradients on gloo.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = world()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (rank * len(x), (rank + 1) * len(x))
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start, end = ctx.rows
        return grad[start:end]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """(B, ...) on every rank -> (world * B, ...) in rank order; gradients flow back to each rank's rows.

    With DDP's gradient averaging this gives exactly the gradients of one process on the whole batch.
    Every rank must pass the same B. Identity without a process group.
    """
    if world()[1] == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(world()[1])]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)
    return _GatherWithGrad.apply(x)
