"""Webdataset tar shards in img2dataset's layout: the training and validation stream, and evaluation sets read from shards
(`qformer make-shards`, in `stages.tools.make_shards`, writes them).

The layout (what img2dataset writes, and what `make-shards` writes from any annotation file):

    DIR/00000.tar          000000000.jpg  000000000.txt  000000000.json  000000002.jpg ...  (keys may have gaps)
    DIR/00000_stats.json   {"successes": 9998, "failed_to_download": 2, "count": 10000, ...}

A sample is `<key>.jpg|.jpeg|.png|.webp` with its caption in `<key>.txt` or under a key (default `caption`) of
`<key>.json`; `.txt` wins when both exist. A spec names shards with brace notation, several specs joined by `::`
(as webdataset and open_clip): `/data/cc3m/{00000..00331}.tar::/data/sbu/{00000..00099}.tar`.

Training reads as open_clip does: each process and data-loader worker reads its own shards (split by rank, then by
worker) in a shuffled cycle, or, with `resampled`, draws shards with replacement; samples pass a shuffle buffer; an
epoch is a fixed number of samples (the `_stats.json` successes, or `data.train_samples`). Every random choice is
seeded from (seed, epoch, rank, worker, restart): a rerun draws the same stream, and a run resumed at step k draws
a fresh one (`restart` = k) from the same distribution instead of replaying the epoch's first samples.

A sample without an image or caption, an unreadable image (the pixel limit is checked from the header before
decoding) and a damaged tar (the rest of that shard) become `skipped` records, counted and named like unreadable
files of a folder (`train/skipped_images`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.data.annotations import Entry, clean_caption
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, UnreadableImage, decode_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


SPEC_SEPARATOR = "::"


# --- shard specs ---------------------------------------------------------------------------------------------
def is_shard_spec(spec: str | None) -> bool:
    return spec is not None and any(part.strip().endswith(".tar") for part in spec.split(SPEC_SEPARATOR))


def expand_shards(spec: str, option: str) -> list[str]:
    """The shard files a spec names, brace notation expanded; every one must exist, and those without a sample are left
    out (a stream over none, or a worker given only empty ones, would wait forever for a first sample)."""
    import braceexpand

    urls = [url for part in spec.split(SPEC_SEPARATOR) if part.strip() for url in braceexpand.braceexpand(part.strip())]
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{option}: {len(missing)} of the {len(urls)} shard(s) of {spec} not found: {shown}")
    kept = [url for url in urls if _holds_a_sample(url)]
    if not kept:
        raise ValueError(f"{option}: the shards of {spec} are empty: no sample in {len(urls)} shard(s); remake them with "
                         f"qformer make-shards from images it can read")
    return kept


def _holds_a_sample(url: str) -> bool:
    try:
        with tarfile.open(url) as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError):  # a damaged tar is not empty: reading it names the damage
        return True


def stats_file(url: str) -> Path:
    path = Path(url)
    return path.with_name(f"{path.stem}_stats.json")


def counted_samples(urls: list[str]) -> int | None:
    """The sum of the shards' `_stats.json` successes; None when a shard has none."""
    total = 0
    for url in urls:
        try:
            total += int(json.loads(stats_file(url).read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def stable_id(text: str) -> int:
    """A 62-bit id of a string, the same in every process and run (Python's `hash` of a str is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


# --- reading ---------------------------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Batches of (image, caption) samples from tar shards, for one process; see the module's docstring.

    Args:
        urls: the shard files.
        transform: image -> tensor (the training or eval transform).
        collate: a list of samples -> a batch (`stages.data.captions.Collate`).
        batch_size: samples per batch.
        rank, world: this process and the number of processes.
        num_workers: data-loader workers of this process (0: the process itself).
        seed: the stream's seed.
        train: shuffled, cycled (or resampled) and cut to `batches_per_worker` batches; else one ordered pass.
        batches_per_worker: each worker's batches in an epoch (training).
        resampled: draw shards with replacement instead of splitting them among processes and workers.
        shuffle_buffer: samples in the shuffle buffer (training).
        caption_key: the caption's key in `<key>.json`.
        max_words: captions are cut to this many words.
        max_image_pixels: larger images (by their header) are skipped before decoding.
    """

    def __init__(self, urls: list[str], transform, collate: Callable, batch_size: int, rank: int, world: int,
                 num_workers: int, seed: int, train: bool, batches_per_worker: int | None = None, resampled: bool = False,
                 shuffle_buffer: int = 1000, caption_key: str = "caption", max_words: int = 50,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        super().__init__()
        self.urls, self.transform, self.collate, self.batch_size = urls, transform, collate, batch_size
        self.rank, self.world, self.num_workers, self.seed, self.train = rank, world, num_workers, seed, train
        self.batches_per_worker, self.resampled, self.shuffle_buffer = batches_per_worker, resampled, shuffle_buffer
        self.caption_key, self.max_words, self.max_image_pixels = caption_key, max_words, max_image_pixels
        self.epoch = 0
        self.restart = 0  # the step a resumed run started at: its stream is a fresh draw
        if train and not resampled:
            self._check_enough_shards()

    def __len__(self) -> int:
        """Batches per epoch of this process (training): every worker yields `batches_per_worker`."""
        if self.batches_per_worker is None:
            raise TypeError("a validation stream has no length")
        return self.batches_per_worker * max(1, self.num_workers)

    def _check_enough_shards(self) -> None:
        readers = self.world * max(1, self.num_workers)
        if len(self.urls) < readers:
            raise ValueError(f"data.train: {len(self.urls)} shard(s) for {self.world} process(es) x {max(1, self.num_workers)} "
                             f"worker(s): each reader needs a shard of its own; use more shards, fewer data.num_workers, "
                             f"or data.resampled true")

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        worker, workers = _worker()
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{self.restart}")
        errors: list[UnreadableImage] = []

        def note_error(error: Exception) -> bool:  # webdataset's handler: a damaged tar is named, then skipped
            errors.append(damaged_tar(error))
            return True

        shards = ({"url": url} for url in self._shard_order(rng, worker, workers))
        samples = wds.tarfile_to_samples(handler=note_error)(shards)
        if self.train:
            samples = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(samples)
        items = _with_errors(samples, errors)
        records = map(self._record, items) if self.train else self._rank_share(items)
        yield from self._batches(records)

    def _shard_order(self, rng: random.Random, worker: int, workers: int) -> Iterator[str]:
        if not self.train:
            yield from self.urls  # every process reads every sample's name in order, and decodes its share
            return
        if self.resampled:
            while True:
                yield rng.choice(self.urls)
        mine = self.urls[self.rank::self.world][worker::workers]
        while True:  # an epoch is a number of samples, not a pass: cycle, reshuffled each time
            yield from rng.sample(mine, len(mine))

    def _record(self, item: dict | UnreadableImage) -> dict:
        if isinstance(item, UnreadableImage):
            return _skipped(item)
        try:
            return self._decode(item)
        except UnreadableImage as error:
            return _skipped(error)

    def _rank_share(self, items: Iterator) -> Iterator[dict]:
        """Validation: every `world`-th sample from this process's rank on, padded with repeats to the same count on
        every process (as DistributedSampler pads; validation counts a repeated sample once)."""
        first, mine, count = [], 0, 0  # at most world - 1 repeats are needed: only that many records are kept
        for count, item in enumerate(items, 1):
            if (count - 1) % self.world == self.rank:
                record = self._record(item)
                mine += 1
                if len(first) < self.world:
                    first.append(record)
                yield record
        if not mine:
            raise ValueError(f"{count} validation sample(s) in the shards, fewer than the {self.world} processes")
        for i in range(math.ceil(count / self.world) - mine):
            yield first[i]

    def _decode(self, sample: dict) -> dict:
        name, image_ext, caption, meta = sample_parts(sample, self.caption_key)
        image = decode_rgb(io.BytesIO(sample[image_ext]), f"{name}.{image_ext}", self.max_image_pixels)
        image_id = meta.get("image_id", sample["__key__"])
        return {"pixel_values": self.transform(image), "caption": clean_caption(caption, self.max_words),
                "image_id": stable_id(f"image:{image_id}"), "sample_id": stable_id(name)}

    def _batches(self, records: Iterator[dict]) -> Iterator[dict]:
        made, batch = 0, []
        for record in records:
            batch.append(record)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                made, batch = made + 1, []
                if self.batches_per_worker is not None and made == self.batches_per_worker:
                    return
        if batch and not self.train:
            yield self.collate(batch)


class ShardLoader(DataLoader):
    """A DataLoader over a `ShardStream` that tells the stream its epoch before each epoch's workers start
    (they get a copy of the stream; Lightning tells epochs only to samplers, which an iterable dataset has none of)."""

    def __init__(self, stream: ShardStream, epoch: Callable[[], int], num_workers: int):
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.current_epoch = epoch

    def __iter__(self):
        self.dataset.epoch = self.current_epoch()
        return super().__iter__()


def sample_parts(sample: dict, caption_key: str) -> tuple[str, str, str, dict]:
    """(name, image extension, caption, .json metadata) of a shard sample; `UnreadableImage` without an image or caption."""
    name = f"{sample.get('__url__', '?')}:{sample['__key__']}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is None:
        raise UnreadableImage(name, "no image in the sample (.jpg, .png or .webp)")
    meta = _json(sample.get("json"), name)
    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else meta.get(caption_key)
    if not isinstance(caption, str) or not caption.strip():
        raise UnreadableImage(name, f"no caption in the sample (.txt, or '{caption_key}' in .json)")
    return name, image_ext, caption, meta


def damaged_tar(error: Exception) -> UnreadableImage:
    """What webdataset's handler is given when a tar cannot be read on: the shard, named (its URL is in the args)."""
    url = next((a for a in error.args[1:] if isinstance(a, str) and a.endswith(".tar")), "a shard")
    return UnreadableImage(url, f"damaged tar, the rest of the shard skipped ({error.args[0]})")


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _with_errors(samples: Iterator[dict], errors: list[UnreadableImage]) -> Iterator[dict | UnreadableImage]:
    """The samples, with the damaged-tar errors webdataset's handler noted put in the stream where they happened."""
    for sample in samples:
        while errors:
            yield errors.pop(0)
        yield sample
    while errors:
        yield errors.pop(0)


def _skipped(error: UnreadableImage) -> dict:
    return {"skipped": error.path, "reason": error.reason}


def _json(data: bytes | None, name: str) -> dict:
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        raise UnreadableImage(name, "its .json is not valid JSON") from None
    return value if isinstance(value, dict) else {}


def epoch_batches(samples: int, batch_size: int, world: int, num_workers: int, option: str) -> int:
    """Each worker's batches in an epoch of `samples` samples over `world` processes (open_clip's rounding up)."""
    per_process = samples // (batch_size * world)
    if per_process < 1:
        raise ValueError(f"{option}: {samples} samples per epoch are fewer than one batch (data.batch_size {batch_size} x "
                         f"{world} process(es))")
    return math.ceil(per_process / max(1, num_workers))


# --- evaluation sets ----------------------------------------------------------------------------------------------
@dataclass
class ShardImages(ImageReader):
    """`ImageReader` over the images of an evaluation set's shards, held in memory: `open("SHARD.tar:KEY")`."""

    images: dict[str, bytes] = field(default_factory=dict)

    def open(self, path) -> Image.Image:
        return decode_rgb(io.BytesIO(self.images[str(path)]), str(path), self.max_pixels)


def shard_eval_set(spec: str, option: str, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                   caption_key: str = "caption") -> tuple[list[Entry], ShardImages]:
    """The entries (one per image: samples with the same `image_id` in their .json merged) and images of shards, for
    `qformer eval retrieval|caption`. A sample without an image or caption, and a damaged tar, are named and counted."""
    import webdataset as wds

    reader = ShardImages(max_image_pixels)
    entries: dict[str, Entry] = {}

    def note_error(error: Exception) -> bool:
        reader.skipped.add(damaged_tar(error))
        return True

    for sample in wds.tarfile_to_samples(handler=note_error)({"url": url} for url in expand_shards(spec, option)):
        try:
            name, image_ext, caption, meta = sample_parts(sample, caption_key)
        except UnreadableImage as error:
            reader.skipped.add(error)
            continue
        image_id = str(meta.get("image_id", name))
        entry = entries.get(image_id)
        if entry is None:
            entry = entries[image_id] = Entry(image=name, captions=[], image_id=image_id)
            reader.images[name] = sample[image_ext]
        entry.captions.append(caption)
    if not entries:
        raise ValueError(f"{option}: no sample with an image and a caption in {spec}")
    return list(entries.values()), reader
