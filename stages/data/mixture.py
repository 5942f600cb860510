"""Task mixtures: `data.train` as several files (or shard specs), each drawn with a probability, in an order a resumed
run replays exactly.

    data:
      train:
        - coco_captions.json                  # no weights: each file is drawn with p proportional to sqrt(its size)
        - {path: vqa.json, weight: 2}         # weights (then on every entry): p proportional to the weight

Without weights the probabilities are InstructBLIP's (p_d ~ sqrt(S_d): large sets are drawn less than their share,
small ones more, without repeating a small one endlessly). An epoch holds as many samples as the files together;
within a file the samples come in a shuffled cycle (no repeat before every sample of it was drawn).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from torch.utils.data import IterableDataset, get_worker_info

from stages.data.sampling import ResumableSampler
from stages.data.webdataset import ShardStream, counted_samples, expand_shards, is_shard_spec

log = logging.getLogger(__name__)

MIXTURE_EXAMPLE = "e.g. [a.json, {path: b.json, weight: 2}]"


@dataclass(frozen=True)
class MixturePart:
    path: str
    weight: float | None  # None: drawn with p ~ sqrt(size)


def parse_mixture(train, option: str = "data.train") -> list[MixturePart]:
    """The parts of `data.train`: one file or shard spec, or a list of them, each a string or {path, weight}."""
    items = [train] if isinstance(train, str) else train
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{option}: give a file, a shard spec or a list of them ({MIXTURE_EXAMPLE}), got {train!r}")
    parts = [_part(item, f"{option}[{i}]") for i, item in enumerate(items)]
    weighted = [p.weight is not None for p in parts]
    if any(weighted) and not all(weighted):
        missing = weighted.index(False)
        raise ValueError(f"{option}[{missing}] ({parts[missing].path}): no weight while others have one; give every entry a "
                         f"weight, or none (then each is drawn with p ~ sqrt(its size))")
    if len({is_shard_spec(p.path) for p in parts}) > 1:
        raise ValueError(f"{option}: a mixture is all annotation files or all shard specs; convert the files with qformer make-shards")
    for i, part in enumerate(parts):
        if not is_shard_spec(part.path) and not Path(part.path).is_file():
            raise FileNotFoundError(f"{option}[{i}]: annotation file not found: {part.path}" if len(parts) > 1 else
                                    f"{option}: annotation file not found: {part.path}")
    return parts


def _part(item, where: str) -> MixturePart:
    if isinstance(item, str) and item.strip():
        return MixturePart(item, None)
    if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"].strip():
        raise ValueError(f"{where}: expected a file name or {{path: FILE, weight: NUMBER}}, got {item!r}")
    unknown = set(item) - {"path", "weight"}
    if unknown:
        raise ValueError(f"{where} ({item['path']}): unknown key(s) {', '.join(sorted(unknown))}; an entry has path and weight")
    weight = item.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
                               or weight <= 0):
        raise ValueError(f"{where} ({item['path']}): weight must be a positive number, got {weight!r}")
    return MixturePart(item["path"], None if weight is None else float(weight))


def mixture_probabilities(parts: list[MixturePart], sizes: list[int]) -> list[float]:
    """Each part's probability: its weight's share, or (no weights) sqrt(size)'s share."""
    raw = [p.weight if p.weight is not None else math.sqrt(size) for p, size in zip(parts, sizes)]
    return [r / sum(raw) for r in raw]


def describe_mixture(parts: list[MixturePart], sizes: list[int], probabilities: list[float]) -> str:
    """The effective ratios, one line per part: printed at start and logged (`data/mixture/<i>`)."""
    rule = "weights" if parts[0].weight is not None else "p ~ sqrt(size)"
    total = sum(sizes)
    lines = [f"task mixture ({rule}), {total} samples per epoch:"]
    for part, size, p in zip(parts, sizes, probabilities):
        name = part.path if len(part.path) < 60 else "..." + part.path[-57:]
        lines.append(f"  {p:6.1%}  {size:>9} samples ({size / total:6.1%} of them)  {name}")
    return "\n".join(lines)


def mixture_order(sizes: list[int], probabilities: list[float], count: int, generator: torch.Generator) -> list[int]:
    """`count` sample indices into the concatenated parts: each position's part drawn by `probabilities`, the samples
    of a part in a shuffled cycle."""
    parts = torch.multinomial(torch.tensor(probabilities, dtype=torch.float64), count, replacement=True, generator=generator)
    order = torch.empty(count, dtype=torch.long)
    offset = 0
    for part, size in enumerate(sizes):
        positions = (parts == part).nonzero().flatten()
        cycles = math.ceil(len(positions) / size) if size else 0
        drawn = [torch.randperm(size, generator=generator) for _ in range(cycles)]
        if len(positions):
            order[positions] = offset + torch.cat(drawn)[: len(positions)]
        offset += size
    return order.tolist()


class MixtureSampler(ResumableSampler):
    """`ResumableSampler` over the concatenated parts of a mixture: each epoch's order is `mixture_order` from
    (seed, epoch), split among processes as DistributedSampler splits its permutation, and resumable the same way."""

    def __init__(self, dataset, batch_size: int, num_replicas: int, rank: int, seed: int, sizes: list[int],
                 probabilities: list[float]):
        super().__init__(dataset, batch_size, num_replicas, rank, seed)
        self.sizes, self.probabilities = sizes, probabilities

    def epoch_indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = mixture_order(self.sizes, self.probabilities, self.total_size, generator)
        return order[self.rank : self.total_size : self.num_replicas]


def shard_mixture(parts: list[MixturePart], train_samples: int | None) -> tuple[list[list[str]], list[int], int]:
    """(shards of each part, samples of each part from its `_stats.json`, samples per epoch) of a mixture of shard specs.
    Without weights every part must be sized by its stats; an epoch is `train_samples`, else all parts' samples."""
    urls = [expand_shards(part.path, f"data.train[{i}]") for i, part in enumerate(parts)]
    sizes = [counted_samples(part_urls) for part_urls in urls]
    for i, (part, size) in enumerate(zip(parts, sizes)):
        if size is None and part.weight is None:
            raise ValueError(f"data.train[{i}] ({part.path}): a shard without _stats.json leaves the part's size unknown; give "
                             f"every entry a weight (and data.train_samples)")
    sizes = [size or 0 for size in sizes]
    samples = train_samples or sum(sizes)
    if not samples:
        raise ValueError("data.train_samples: give the samples per epoch (the shards have no _stats.json)")
    return urls, sizes, samples


class ShardMixture(IterableDataset):
    """A mixture of shard streams as LAVIS's `MultiIterLoader` mixes datasets: each batch comes whole from one part's
    `ShardStream`, drawn by the probabilities, seeded as the streams are (a resumed run is a fresh draw, `restart`).
    Each part's stream may give the whole epoch's batches, so none runs out however often it is drawn."""

    def __init__(self, streams: list[ShardStream], probabilities: list[float], batches_per_worker: int):
        super().__init__()
        self.streams, self.probabilities, self.batches_per_worker = streams, probabilities, batches_per_worker
        self.epoch, self.restart = 0, 0
        self.seed, self.rank, self.num_workers = streams[0].seed, streams[0].rank, streams[0].num_workers

    def __len__(self) -> int:
        return self.batches_per_worker * max(1, self.num_workers)

    def __iter__(self):
        info = get_worker_info()
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{0 if info is None else info.id}/{self.restart}/mixture")
        for stream in self.streams:
            stream.epoch, stream.restart = self.epoch, self.restart
        batches = [iter(stream) for stream in self.streams]
        for _ in range(self.batches_per_worker):
            yield next(batches[rng.choices(range(len(batches)), weights=self.probabilities)[0]])
