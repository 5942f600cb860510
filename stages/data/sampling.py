"""Per-sample randomness and the resumable sampler: a sample's augmentation is drawn from (seed, epoch, index),
not from a stream a restart would reset, and the sampler can skip the batches already trained."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.data import DistributedSampler


@contextmanager
def sample_rng(seed: int, epoch: int, index: int):
    """torch's RNG seeded from (seed, epoch, index) inside the block, as it was outside it: a sample's augmentation
    is the same whichever worker draws it and whether or not the run was resumed in between."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only (augmentations draw from it): `torch.manual_seed` would also reseed every CUDA, XPU and
        # MTIA generator, which fork_rng(devices=[]) does not restore, and while CUDA is not initialised each such call
        # records its stack (traceback.format_stack) for later: about half of a 48-px demo batch's loading CPU time.
        torch.default_generator.manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1))
        yield


def sample_key(key) -> tuple[int | None, int]:
    """(epoch, index) from a training key of `ResumableSampler`, (None, index) from a plain index."""
    return key if isinstance(key, tuple) else (None, key)


# --- the data position -----------------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """DistributedSampler's shuffle (a permutation from seed + epoch, one share per rank, `drop_last`) yielding
    (epoch, index) keys, that can start an epoch part-way: `resume_at = (epoch, batches)` skips the batches a
    checkpoint had already trained on. Its length stays the whole epoch's, as Lightning counts a resumed epoch's
    batches from where it stopped."""

    def __init__(self, dataset, batch_size: int, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.resume_at: tuple[int, int] | None = None

    def __iter__(self):  # a generator: the permutation is drawn at the first batch, after a checkpoint is restored
        skip = 0
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            skip = self.resume_at[1] * self.batch_size
            self.resume_at = None
        for index in self.epoch_indices()[skip:]:
            yield self.epoch, index

    def epoch_indices(self) -> list[int]:
        """This process's sample indices of the epoch, in order (`stages.data.mixture.MixtureSampler` draws its own)."""
        return list(super().__iter__())
