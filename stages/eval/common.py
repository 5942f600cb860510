"""What the three evaluations share (`qformer eval retrieval | caption | vqa`): the evaluation set, the processes,
the output files.

Each runs on one process, or sharded over several when started with `torchrun` (results are identical).
Entries showing the same image are evaluated as one image with all their captions. Each image is read
once; a missing or unreadable one is named once on stderr, skipped and counted in the output.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qformer.workshare import WorkShare
from stages.data.annotations import Entry, load_annotations
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader
from stages.distributed import current_share, device_for, gather_objects, init_distributed


class NoReadableImage(ValueError):
    """Every image of an evaluation set was unreadable."""


# --- data ---------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One entry per distinct image (entries of the same image merged); its images are read when used."""

    entries: list[Entry]
    reader: ImageReader  # or a `stages.data.feature_cache.FeatureReader`: the eval view of each image, from a cache

    @classmethod
    def load(cls, annotations: str, image_root: str | None, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
             allow_outside_root: bool = False, features: str | None = None, encoder=None) -> "EvalSet":
        """The images are read from `image_root`, or their tokens from the feature cache `features` (checked against `encoder`)."""
        from stages.data.feature_cache import image_source
        from stages.data.webdataset import is_shard_spec, shard_eval_set

        if is_shard_spec(annotations):
            if features is not None:
                raise ValueError("--features: a feature cache is read with an annotation file, not with shards (--data)")
            return cls(*shard_eval_set(annotations, "--data", max_image_pixels))
        entries = load_annotations(annotations, allow_outside_root)
        reader = image_source(image_root, features, encoder, [e.image for e in entries], annotations, max_image_pixels, allow_outside_root)
        return cls(entries, reader)

    @property
    def image_root(self) -> Path:
        return self.reader.root

    def unreadable(self, share: WorkShare) -> int:
        """Unreadable images over all processes (each image is read, and so counted, by one process only)."""
        count = len({path for part in gather_objects(list(self.reader.skipped.reasons)) for path in part}) if share.world > 1 else len(self.reader.skipped)
        self.reader.skipped.finish(count if share.is_main else len(self.reader.skipped))
        return count

    def nothing_readable(self) -> NoReadableImage:
        where = f"under {self.image_root}" if self.image_root is not None else "in its shards"
        return NoReadableImage(f"no readable image among the {len(self.entries)} of the evaluation set {where}")


def progress(enabled: bool, desc: str):
    return lambda items: tqdm(items, desc=desc, disable=not enabled, file=sys.stderr)


# --- the commands -----------------------------------------------------------------------------------------
def print_scores(title: str, scores: dict) -> None:
    print(title)
    width = max(len(k) for k in scores)
    for key, value in scores.items():
        print(f"  {key:<{width}}  {value:.2f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


@dataclass
class EvalOptions:
    """What every evaluation command takes besides its model and its task's settings.

    Args:
        data: annotation file (LAVIS / COCO-Karpathy list, or official COCO captions) for retrieval and captioning,
            question file for VQA; or webdataset shards (`DIR/{00000..00009}.tar`, img2dataset's layout; read into
            memory, no --images needed) for retrieval and captioning.
        images: image root folder the annotation paths are relative to.
        features: read the images' eval view from this feature cache (qformer cache-features) instead of --images.
        batch_size: images (and ITM pairs) or questions per batch.
        device: cpu, cuda or cuda:N (one GPU per process under torchrun).
        json: also write the scores to this JSON file.
        no_progress: no progress bars.
        max_image_pixels: skip images whose header declares more pixels, before decoding.
        allow_outside_root: read annotation paths that lead outside --images (absolute, '..', symbolic links).
    """

    data: str
    images: str | None = None
    features: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    json: str | None = None
    no_progress: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_outside_root: bool = False

    def check_batch_size(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")

    def load_set(self, encoder) -> EvalSet:
        """The evaluation set of --data, its images from --images or --features (checked against `encoder`)."""
        return EvalSet.load(self.data, self.images, self.max_image_pixels, self.allow_outside_root, self.features, encoder)


def setup_processes(device: str) -> tuple[WorkShare, torch.device]:
    """This process's share of the work (one process, or one of torchrun's) and its device."""
    rank, _ = init_distributed(device)
    return current_share(), device_for(device, rank)
