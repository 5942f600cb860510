"""The gather the stage-1 losses need, across however many processes Lightning started."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
