"""`qformer make-shards`: image-caption pairs written as webdataset tar shards in img2dataset's layout."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

from stages.data.annotations import load_annotations
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, SkippedImages, UnreadableImage
from stages.data.webdataset import IMAGE_EXTENSIONS


# --- writing: `qformer make-shards` ---------------------------------------------------------------------------------
def make_shards(annotations: list[str], *, images: str, out: str, samples_per_shard: int = 10000, seed: int = 0,
                shuffle: bool = True, overwrite: bool = False, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                allow_outside_root: bool = False) -> int:
    """Write image-caption pairs as webdataset tar shards in img2dataset's layout (`NNNNN.tar` + `NNNNN_stats.json`).

    One sample per (image, caption) pair: `<key>.jpg|png|webp` (the file's own bytes; other formats are stored as
    PNG), `<key>.txt` (the caption) and `<key>.json` (caption, image path and image id, so that training still knows
    which captions share an image). Unreadable images are named, left out and counted in `failed_to_download`; when
    not one image can be read, nothing is written and the command fails with one line giving the first reasons.

    Args:
        annotations: annotation file(s) in any format the project reads (COCO/LAVIS JSON lists, captions files).
        images: the folder the annotation paths are relative to.
        out: the folder to write the shards into.
        samples_per_shard: samples per tar file.
        seed: the order of the pairs (shuffled, so that one image's captions do not fill one batch).
        shuffle: shuffle the pairs; `--no-shuffle` keeps the annotation order.
        overwrite: replace an existing non-empty --out folder.
        max_image_pixels: images whose header declares more pixels are left out (unset: no limit).
        allow_outside_root: read annotation paths that lead outside --images.
    """
    from qformer.files import atomic_folder

    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if not Path(images).is_dir():
        raise FileNotFoundError(f"--images: image folder not found: {images}")
    pairs = [(entry, caption) for file in annotations for entry in load_annotations(file, allow_outside_root)
             for caption in entry.captions]
    if shuffle:
        random.Random(seed).shuffle(pairs)
    reader = ImageReader(max_image_pixels, Path(images), allow_outside_root)
    notes = HeldNotes()
    skipped = SkippedImages(notes)
    digits = max(4, len(str(samples_per_shard - 1)))
    with atomic_folder(out, overwrite) as folder:  # an error inside leaves no folder behind
        shards = [pairs[i:i + samples_per_shard] for i in range(0, len(pairs), samples_per_shard)]
        written = sum(_write_shard(folder, number, shard, reader, skipped, digits, notes) for number, shard in enumerate(shards))
        if not written:
            raise ValueError(_none_readable(skipped, images))
    skipped.finish()
    print(f"wrote {written} samples in {len(shards)} shard(s) to {out}" + (f"; {len(skipped)} left out" if len(skipped) else ""))
    return 0


class HeldNotes:
    """The 'skipping FILE: reason' notes, held until an image has been read: when none can be (a wrong --images), the
    command's one error line says so instead of a screen of notes. `SkippedImages` names at most 20, so few are held."""

    def __init__(self):
        self.held: list[str] | None = []

    def __call__(self, line: str) -> None:
        if self.held is None:
            print(line, file=sys.stderr)
        else:
            self.held.append(line)

    def release(self) -> None:
        for line in self.held or []:
            print(line, file=sys.stderr)
        self.held = None


def _none_readable(skipped: SkippedImages, images: str) -> str:
    reasons = list(skipped.reasons.items())
    first = "; ".join(f"{path}: {reason}" for path, reason in reasons[:3]) + (" ..." if len(reasons) > 3 else "")
    hint = (f" (is --images {images} the folder the annotation paths are relative to?)"
            if all(reason == "file not found" for _, reason in reasons) else "")
    return f"0 of {len(reasons)} images could be read; first errors: {first}{hint}; no shards written"


def _write_shard(folder: Path, number: int, pairs, reader: ImageReader, skipped: SkippedImages, digits: int,
                 notes: HeldNotes) -> int:
    import webdataset as wds

    successes = 0
    with wds.TarWriter(str(folder / f"{number:05d}.tar")) as tar:
        for index, (entry, caption) in enumerate(pairs):
            try:
                extension, data = _image_bytes(reader, entry.image)
            except UnreadableImage as error:
                skipped.add(error)
                continue
            key = f"{number:05d}{index:0{digits}d}"
            meta = {"caption": caption, "image": entry.image, "image_id": str(entry.image_id)}
            tar.write({"__key__": key, extension: data, "txt": caption, "json": meta})
            successes += 1
            notes.release()
    stats = {"count": len(pairs), "successes": successes, "failed_to_download": len(pairs) - successes}
    (folder / f"{number:05d}_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return successes


def _image_bytes(reader: ImageReader, relative: str) -> tuple[str, bytes]:
    """(extension, bytes) of an annotation's image, checked to decode; JPEG, PNG and WebP as they are, others as PNG."""
    image = reader.open(relative)  # raises UnreadableImage, named and counted by the caller
    path = reader.path(relative)
    extension = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    if extension in IMAGE_EXTENSIONS:
        return extension, path.read_bytes()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()
