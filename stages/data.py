"""Image-caption data: annotation files, robust image loading, transforms and the Lightning data module.

Two annotation formats are read:
* LAVIS / COCO-Karpathy: `[{"image": "rel/path.jpg", "caption": "..." or ["...", ...], "image_id": ...}, ...]`
* official COCO captions: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`

An image that cannot be decoded is skipped, counted and reported (or fails at once with `strict`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is broken, not silently grey


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


def load_annotations(path: str | Path) -> list[Entry]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}: not valid JSON ({error})") from error
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _coco_entries(path, data)
    if isinstance(data, list):
        return [_lavis_entry(path, i, item) for i, item in enumerate(data)]
    raise AnnotationError(f"{path}: expected a list of entries or a COCO dict with 'images' and 'annotations'")


def _lavis_entry(path: Path, index: int, item) -> Entry:
    where = f"{path}: entry {index}"
    if not isinstance(item, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(item).__name__}")
    if not isinstance(item.get("image"), str):
        raise AnnotationError(f"{where}: 'image' must be a path string")
    captions = item.get("caption")
    captions = [captions] if isinstance(captions, str) else captions
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise AnnotationError(f"{where}: 'caption' must be a string or a non-empty list of strings")
    return Entry(item["image"], captions, str(item.get("image_id", item["image"])))


def _coco_entries(path: Path, data: dict) -> list[Entry]:
    files = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise AnnotationError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        files[image["id"]] = image["file_name"]
    captions: dict = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or ann.get("image_id") not in files or not isinstance(ann.get("caption"), str):
            raise AnnotationError(f"{path}: annotations[{i}] needs a known 'image_id' and a 'caption' string")
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    return [Entry(files[i], c, str(i)) for i, c in captions.items()]


def load_rgb(path: str | Path) -> Image.Image:
    """Open any image as 8-bit RGB: grayscale, palette, CMYK, alpha (on white) and 16-bit included."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v * (1 / 256)).convert("L")
        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA"):
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            return background
        return image.convert("RGB")


def train_transform(image_size: int, hflip: bool = True, crop_scale: tuple[float, float] = (0.5, 1.0)) -> T.Compose:
    steps = [T.RandomResizedCrop(image_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


class CaptionDataset(Dataset):
    """One sample per (image, caption) pair. A broken image yields None (or raises with `strict`)."""

    def __init__(self, entries: list[Entry], image_root: str | Path, transform, max_words: int = 50, strict: bool = False):
        self.image_root = Path(image_root)
        self.transform = transform
        self.strict = strict
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
        path = self.image_root / image
        try:
            pixels = self.transform(load_rgb(path))
        except (OSError, ValueError, SyntaxError) as error:  # missing, truncated, undecodable
            if self.strict:
                raise OSError(f"cannot read image {path}: {error}") from error
            return {"skipped": str(path), "reason": str(error)}
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
        batch = {"skipped": [s["skipped"] for s in samples if "skipped" in s]}
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
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.tokenizer is None and hp.tokenizer_dir is not None:
            from qformer.bert import load_tokenizer

            self.tokenizer = load_tokenizer(hp.tokenizer_dir)
        self.train_set = CaptionDataset(load_annotations(hp.train), hp.image_root, train_transform(hp.image_size, hp.hflip, tuple(hp.crop_scale)), hp.max_words, hp.strict)
        self.val_set = None
        if hp.val is not None:
            self.val_set = CaptionDataset(load_annotations(hp.val), hp.image_root, eval_transform(hp.image_size), hp.max_words, hp.strict)

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
