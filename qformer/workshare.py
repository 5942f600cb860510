"""A process's share of work split over several processes, as one small value.

The model library never calls `torch.distributed`: whoever starts the processes (`stages.distributed`)
builds a `WorkShare` whose `reduce_sum` sums a tensor over all of them. The default is one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


def no_reduce(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class WorkShare:
    rank: int = 0
    world: int = 1
    reduce_sum: Callable[[Tensor], Tensor] = no_reduce  # a sum over all processes, in place or not

    def owned(self, count: int) -> list[int]:
        """The items of `count` this process works on: every `world`-th, starting at `rank`."""
        return list(range(self.rank, count, self.world))

    @property
    def is_main(self) -> bool:
        return self.rank == 0
