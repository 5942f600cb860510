"""The (image, caption) dataset and its batches: one sample per caption, or per instruction (`stages.data.instructions`);
the Lightning data module (`stages.data.captions`) builds them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

from stages.data.annotations import Entry, clean_caption
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, UnreadableImage
from stages.data.instructions import sample_text
from stages.data.sampling import sample_key, sample_rng


def caption_samples(entries: list[Entry], max_words: int = 50) -> list[tuple[str, str, int]]:
    """(image path, cleaned caption, image index) for every caption: the samples of one split."""
    image_index: dict[str, int] = {}
    samples = []
    for entry in entries:
        index = image_index.setdefault(entry.image_id, len(image_index))
        samples += [(entry.image, clean_caption(caption, max_words), index) for caption in entry.captions]
    return samples


def first_captions(samples: list[tuple[str, str, int]], per_image: int | None) -> list[tuple[str, str, int]]:
    """The first `per_image` (image path, text, image index) samples of each image, in order; all with None."""
    if per_image is None:
        return samples
    kept, counts = [], Counter()
    for sample in samples:
        if counts[sample[2]] < per_image:
            counts[sample[2]] += 1
            kept.append(sample)
    return kept


class CaptionDataset(Dataset):
    """One sample per (image, caption) pair. An unreadable image yields a `skipped` record (or raises with `strict`).

    Keyed by (epoch, index) in training, a sample's random crop and flip are drawn from (`seed`, epoch, index), and
    then, for instruction data (`stages.data.instructions`), its instruction and output.
    `samples` (image, caption or `InstructionText`, image index) replace those made of `entries`.
    """

    def __init__(self, entries: list[Entry] | None, image_root: str | Path, transform, max_words: int = 50, strict: bool = False,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, allow_outside_root: bool = False,
                 samples: list | None = None):
        self.reader = ImageReader(max_image_pixels, Path(image_root), allow_outside_root)  # skips are reported per batch
        self.transform = transform
        self.strict = strict
        self.samples = caption_samples(entries, max_words) if samples is None else samples
        self.seed = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = sample_key(key)
        image, text, image_index = self.samples[i]
        try:
            picture = self.reader.open(image)
            if epoch is None:
                pixels, fields = self.transform(picture), sample_text(text, drawn=False)
            else:
                with sample_rng(self.seed, epoch, i):  # the text is drawn after the crop and flip, which stay as they were
                    pixels, fields = self.transform(picture), sample_text(text, drawn=True)
        except UnreadableImage as error:
            if self.strict:
                raise
            return {"skipped": error.path, "reason": error.reason}
        return {"pixel_values": pixels, **fields, "image_id": image_index, "sample_id": i, "epoch": epoch or 0}


class Collate:
    """Stacks images and turns captions into the training module's text tensors; reports the skipped samples by path.

    `encode_text(captions, keys)` is the training module's (`text_encoder()`): tokenizing happens here, in the data
    workers, once, with the tokenizer the model uses. `keys` are each sample's (epoch, index), for text randomness
    that a resumed run draws again identically. A batch with instruction data also passes `instructions` (None for a
    sample without one), which only an encoder with `takes_instructions` is given (the data module checks).

    Skipped samples are replaced by copies of the batch's good ones (same image id, so the losses treat
    them as positives, never as negatives): every rank keeps the same batch size, which the global-batch
    gathers need.
    """

    def __init__(self, encode_text):
        self.encode_text = encode_text

    def __call__(self, samples: list[dict]) -> dict:
        good = [s for s in samples if "skipped" not in s]
        batch = {"skipped": [f"{s['skipped']} ({s['reason']})" for s in samples if "skipped" in s]}
        if not good:
            return batch
        good = [good[i % len(good)] for i in range(len(samples))]
        captions = [s["caption"] for s in good]
        batch.update(
            pixel_values=torch.stack([s["pixel_values"] for s in good]),
            image_ids=torch.tensor([s["image_id"] for s in good]),
            sample_ids=torch.tensor([s["sample_id"] for s in good]),
            captions=captions,
        )
        keys = [(s.get("epoch", 0), s["sample_id"]) for s in good]
        if any("instruction" in s for s in good):
            batch["instructions"] = [s.get("instruction") for s in good]
            batch.update(self.encode_text(captions, keys, instructions=batch["instructions"]))
        else:
            batch.update(self.encode_text(captions, keys))
        return batch
