"""Image-caption data: annotation files, transforms and the Lightning data module.

Two annotation formats are read:
* LAVIS / COCO-Karpathy: `[{"image": "rel/path.jpg", "caption": "..." or ["...", ...], "image_id": ...}, ...]`
* official COCO captions: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`

Entries showing the same image (the same `image_id`, or the same path when there is none) are merged into
one, their captions united: a file with one caption per entry (LAVIS's training format) and a list of
captions per entry describe the same data. An image id used for two paths, or a path under two ids, is refused.

An image that cannot be read is skipped, counted and reported (or fails at once with `strict`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from qformer.vision import IMAGE_MEAN, IMAGE_STD
from stages.images import DEFAULT_MAX_IMAGE_PIXELS, OUTSIDE_ROOT_HINT, UnreadableImage, escapes_root, image_under_root, read_rgb

log = logging.getLogger(__name__)



class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and the entry."""


@dataclass
class Entry:
    image: str  # path relative to the image root
    captions: list[str]
    image_id: str


def clean_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's `pre_caption`: lowercase, punctuation to spaces, collapsed whitespace, at most `max_words`."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def read_json(path: str | Path, what: str = "annotation file"):
    """A JSON file, with one-line errors naming it: missing, not UTF-8, not JSON, nested too deeply."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise AnnotationError(f"{path}: JSON nested too deeply to be an annotation file") from None


def load_annotations(path: str | Path, allow_outside_root: bool = False) -> list[Entry]:
    """One entry per distinct image, captions united; malformed files and entries are named."""
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        entries = _coco_entries(path, data)
    elif isinstance(data, list):
        entries = [_lavis_entry(path, i, item) for i, item in enumerate(data)]
    else:
        raise AnnotationError(f"{path}: expected a list of entries or a COCO dict with 'images' and 'annotations'")
    if not entries:
        raise AnnotationError(f"{path}: no entries")
    if not allow_outside_root:
        for i, entry in enumerate(entries):
            if escapes_root(entry.image):
                raise AnnotationError(f"{path}: entry {i}: image path {entry.image!r} leads outside the image root; "
                                      f"annotation paths are relative to it ({OUTSIDE_ROOT_HINT})")
    return group_by_image(entries, path)


def group_by_image(entries: list[Entry], source: Path) -> list[Entry]:
    """Merge entries of the same image (same id; same path when the id is the path), uniting their captions."""
    by_id: dict[str, Entry] = {}
    id_of_path: dict[str, str] = {}
    for entry in entries:
        known_id = id_of_path.setdefault(entry.image, entry.image_id)
        if known_id != entry.image_id:
            raise AnnotationError(f"{source}: image {entry.image!r} appears under two image ids, {known_id!r} and "
                                  f"{entry.image_id!r}; one image must have one id")
        group = by_id.get(entry.image_id)
        if group is None:
            by_id[entry.image_id] = Entry(entry.image, list(dict.fromkeys(entry.captions)), entry.image_id)
        elif group.image != entry.image:
            raise AnnotationError(f"{source}: image id {entry.image_id!r} is used for two images, {group.image!r} and "
                                  f"{entry.image!r}")
        else:
            group.captions += [c for c in entry.captions if c not in group.captions]
    if len(by_id) < len(entries):
        log.info("%s: %d entries describe %d distinct images; their captions were merged", source, len(entries), len(by_id))
    return list(by_id.values())


def _image_id(where: str, value) -> str:
    """An id as text; NaN, infinity, booleans and containers are refused (they would merge or collide silently)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise AnnotationError(f"{where}: 'image_id' must be a string or a number, got {json.dumps(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AnnotationError(f"{where}: 'image_id' is {value}, not a usable id")
        if value.is_integer():
            value = int(value)
    return str(value)


def _lavis_entry(path: Path, index: int, item) -> Entry:
    where = f"{path}: entry {index}"
    if not isinstance(item, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(item).__name__}")
    if not isinstance(item.get("image"), str) or not item["image"]:
        raise AnnotationError(f"{where}: 'image' must be a path string")
    captions = item.get("caption")
    captions = [captions] if isinstance(captions, str) else captions
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise AnnotationError(f"{where}: 'caption' must be a string or a non-empty list of strings")
    image_id = item["image"] if item.get("image_id") is None else _image_id(where, item["image_id"])
    return Entry(item["image"], captions, image_id)


def _coco_entries(path: Path, data: dict) -> list[Entry]:
    if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
        raise AnnotationError(f"{path}: 'images' and 'annotations' must be lists")
    files = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise AnnotationError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        image_id = _image_id(f"{path}: images[{i}]", image["id"])
        if files.setdefault(image_id, image["file_name"]) != image["file_name"]:
            raise AnnotationError(f"{path}: images[{i}]: id {image_id!r} is used for two files, {files[image_id]!r} "
                                  f"and {image['file_name']!r}")
    captions: dict = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise AnnotationError(f"{where} needs an 'image_id' and a 'caption' string")
        image_id = _image_id(where, ann["image_id"])
        if image_id not in files:
            raise AnnotationError(f"{where}: image_id {image_id!r} is not in 'images'")
        captions.setdefault(image_id, []).append(ann["caption"])
    return [Entry(files[i], c, i) for i, c in captions.items()]


def train_transform(image_size: int, hflip: bool = True, crop_scale: tuple[float, float] = (0.5, 1.0)) -> T.Compose:
    steps = [T.RandomResizedCrop(image_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGE_MEAN, IMAGE_STD)])


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGE_MEAN, IMAGE_STD),
        ]
    )


class CaptionDataset(Dataset):
    """One sample per (image, caption) pair. An unreadable image yields a `skipped` record (or raises with `strict`)."""

    def __init__(self, entries: list[Entry], image_root: str | Path, transform, max_words: int = 50, strict: bool = False,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, allow_outside_root: bool = False):
        self.image_root = Path(image_root)
        self.transform = transform
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.allow_outside_root = allow_outside_root
        image_index = {}
        self.samples = []
        for entry in entries:
            index = image_index.setdefault(entry.image_id, len(image_index))
            for caption in entry.captions:
                self.samples.append((entry.image, clean_caption(caption, max_words), index))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image, caption, image_index = self.samples[i]
        try:
            path = image_under_root(self.image_root, image, self.allow_outside_root)
            pixels = self.transform(read_rgb(path, self.max_image_pixels))
        except UnreadableImage as error:
            if self.strict:
                raise
            return {"skipped": error.path, "reason": error.reason}
        return {"pixel_values": pixels, "caption": caption, "image_id": image_index, "sample_id": i}


class Collate:
    """Stacks images and tokenizes captions; reports the skipped samples of the batch by path.

    Skipped samples are replaced by copies of the batch's good ones (same image id, so the losses treat
    them as positives, never as negatives): every rank keeps the same batch size, which the global-batch
    gathers need.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: list[dict]) -> dict:
        good = [s for s in samples if "skipped" not in s]
        batch = {"skipped": [f"{s['skipped']} ({s['reason']})" for s in samples if "skipped" in s]}
        if not good:
            return batch
        good = [good[i % len(good)] for i in range(len(samples))]
        # Fixed-length padding, as LAVIS: every rank's text has the same shape, which the ITM gather needs.
        text = self.tokenizer(
            [s["caption"] for s in good], padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch.update(
            pixel_values=torch.stack([s["pixel_values"] for s in good]),
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            image_ids=torch.tensor([s["image_id"] for s in good]),
            sample_ids=torch.tensor([s["sample_id"] for s in good]),
            captions=[s["caption"] for s in good],
        )
        return batch


class CaptionDataModule(pl.LightningDataModule):
    """Image-caption data for stage 1 and stage 2.

    Args:
        train: annotation file for training.
        val: annotation file for validation (optional).
        image_root: folder the annotation paths are relative to.
        image_size: must equal the model's `vision_config.image_size`.
        tokenizer_dir: BERT tokenizer folder (vocab.txt / tokenizer.json); the training module sets its own when omitted.
        max_length: text tokens per caption.
        max_words: captions are cut to this many words before tokenizing (LAVIS: 50).
        hflip: random horizontal flips in training (turn off when captions say left/right).
        crop_scale: RandomResizedCrop's area range in training (LAVIS: 0.5 to 1; [1, 1] when captions say small/large).
        strict: fail on the first unreadable image instead of skipping it.
        max_image_pixels: images whose header declares more pixels are skipped before decoding (null: no limit).
        allow_outside_root: read annotation paths that lead outside `image_root` (absolute, `..`, symbolic links).
    """

    def __init__(
        self,
        train: str,
        image_root: str,
        val: str | None = None,
        image_size: int = 224,
        tokenizer_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        max_length: int = 32,
        max_words: int = 50,
        hflip: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        strict: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        allow_outside_root: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.tokenizer is None and hp.tokenizer_dir is not None:
            from qformer.bert import load_tokenizer

            self.tokenizer = load_tokenizer(hp.tokenizer_dir)
        self.train_set = self._dataset(hp.train, train_transform(hp.image_size, hp.hflip, tuple(hp.crop_scale)))
        self.val_set = None if hp.val is None else self._dataset(hp.val, eval_transform(hp.image_size))
        world = self.trainer.world_size if self.trainer is not None else 1
        if stage in (None, "fit") and len(self.train_set) < hp.batch_size * world:
            raise ValueError(f"data.train: {hp.train} has {len(self.train_set)} image-caption pairs, fewer than one batch "
                             f"(data.batch_size {hp.batch_size} x {world} process(es)); lower data.batch_size")

    def _dataset(self, annotations: str, transform) -> CaptionDataset:
        hp = self.hparams
        entries = load_annotations(annotations, hp.allow_outside_root)
        return CaptionDataset(entries, hp.image_root, transform, hp.max_words, hp.strict, hp.max_image_pixels, hp.allow_outside_root)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        if self.tokenizer is None:
            raise ValueError("data.tokenizer_dir: give a BERT tokenizer folder (the training module sets its own when used with one)")
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=Collate(self.tokenizer, self.hparams.max_length),
            drop_last=shuffle,  # equal batches on every rank for the global-batch losses
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)
