"""Image-caption training data: transforms, the dataset of (image, caption) pairs and the Lightning data module.

Annotation files are read by `stages.annotations`; an image that cannot be read is skipped, counted and
reported (or fails at once with `strict`).
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from qformer.vision import IMAGE_MEAN, IMAGE_STD
from stages.annotations import Entry, clean_caption, load_annotations
from stages.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, UnreadableImage, check_pixel_limit


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


def caption_samples(entries: list[Entry], max_words: int = 50) -> list[tuple[str, str, int]]:
    """(image path, cleaned caption, image index) for every caption: the samples of one split."""
    image_index: dict[str, int] = {}
    samples = []
    for entry in entries:
        index = image_index.setdefault(entry.image_id, len(image_index))
        samples += [(entry.image, clean_caption(caption, max_words), index) for caption in entry.captions]
    return samples


class CaptionDataset(Dataset):
    """One sample per (image, caption) pair. An unreadable image yields a `skipped` record (or raises with `strict`)."""

    def __init__(self, entries: list[Entry], image_root: str | Path, transform, max_words: int = 50, strict: bool = False,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, allow_outside_root: bool = False):
        self.reader = ImageReader(max_image_pixels, Path(image_root), allow_outside_root)  # skips are reported per batch
        self.transform = transform
        self.strict = strict
        self.samples = caption_samples(entries, max_words)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image, caption, image_index = self.samples[i]
        try:
            pixels = self.transform(self.reader.open(image))
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
        image_root: folder the annotation paths are relative to (not needed with `features`).
        image_size: must equal the model's `vision_config.image_size`.
        tokenizer_dir: BERT tokenizer folder (vocab.txt / tokenizer.json); the training module sets its own when omitted.
        max_length: text tokens per caption.
        max_words: captions are cut to this many words before tokenizing (LAVIS: 50).
        hflip: random horizontal flips in training (turn off when captions say left/right).
        crop_scale: RandomResizedCrop's area range in training (LAVIS: 0.5 to 1; [1, 1] when captions say small/large).
        strict: fail on the first unreadable image instead of skipping it.
        max_image_pixels: images whose header declares more pixels are skipped before decoding (null: no limit).
        allow_outside_root: read annotation paths that lead outside `image_root` (absolute, `..`, symbolic links).
        features: a feature cache folder (`qformer cache-features`) holding every image of `train` (and of `val`,
            unless `val_features` is given): no image is read; each training sample takes one of the cache's
            training views at random (its eval view when it has none), validation the eval view.
        val_features: the validation split's feature cache, when it is not `features` (e.g. one of eval views only).
    """

    def __init__(
        self,
        train: str,
        image_root: str | None = None,
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
        features: str | None = None,
        val_features: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None
        for name in ("batch_size", "max_length", "max_words", "image_size"):
            if getattr(self.hparams, name) < 1:
                raise ValueError(f"data.{name} must be at least 1, got {getattr(self.hparams, name)}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {num_workers}")
        check_pixel_limit(max_image_pixels, "data.max_image_pixels")

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.features is None and hp.val_features is not None:
            raise ValueError("data.val_features: give data.features too (the training split's feature cache)")
        if hp.features is None and hp.image_root is None:
            raise ValueError("data.image_root: give the image folder the annotation paths are relative to (or data.features)")
        if hp.features is None and not Path(hp.image_root).is_dir():  # before a whole epoch of "file not found"
            raise FileNotFoundError(f"data.image_root: image folder not found: {hp.image_root}")
        if self.tokenizer is None and hp.tokenizer_dir is not None:
            from qformer.bert import load_tokenizer

            self.tokenizer = load_tokenizer(hp.tokenizer_dir)
        if hp.features is None:
            self.caches = []
            self.train_set = self._dataset(hp.train, train_transform(hp.image_size, hp.hflip, tuple(hp.crop_scale)))
            self.val_set = None if hp.val is None else self._dataset(hp.val, eval_transform(hp.image_size))
        else:
            self._cached_datasets()
        world = self.trainer.world_size if self.trainer is not None else 1
        if stage in (None, "fit") and len(self.train_set) < hp.batch_size * world:
            raise ValueError(f"data.train: {hp.train} has {len(self.train_set)} image-caption pairs, fewer than one batch "
                             f"(data.batch_size {hp.batch_size} x {world} process(es)); lower data.batch_size")

    def _cached_datasets(self) -> None:
        from stages.feature_cache import FeatureCache

        hp = self.hparams
        train_cache = FeatureCache(hp.features, "data.features")
        train_cache.check_transform(hp.hflip, hp.crop_scale)
        val_cache = train_cache if hp.val_features is None else FeatureCache(hp.val_features, "data.val_features")
        self.caches = [train_cache] + ([val_cache] if val_cache is not train_cache else [])
        self.train_set = self._cached_dataset(hp.train, train_cache, train=True)
        self.val_set = None if hp.val is None else self._cached_dataset(hp.val, val_cache, train=False)

    def _cached_dataset(self, annotations: str, cache, train: bool):
        from stages.feature_cache import CachedCaptionDataset

        hp = self.hparams
        entries = load_annotations(annotations, hp.allow_outside_root)
        cache.require([e.image for e in entries], annotations)
        return CachedCaptionDataset(caption_samples(entries, hp.max_words), cache, train, hp.strict)

    def check_encoder(self, encoder) -> None:
        """The model's frozen encoder must be the one the feature caches were made with (or take this data's image size)."""
        if self.hparams.features is None:
            if self.hparams.image_size != encoder.config.image_size:
                raise ValueError(f"data.image_size is {self.hparams.image_size} but the model's vision_config.image_size is "
                                 f"{encoder.config.image_size}")
            return
        for cache in self.caches:
            cache.check_encoder(encoder)

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
