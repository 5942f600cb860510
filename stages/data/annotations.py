"""Annotation files: LAVIS / COCO-Karpathy lists and official COCO captions, read strictly, one entry per image.

Two formats are read:
* LAVIS / COCO-Karpathy: `[{"image": "rel/path.jpg", "caption": "..." or ["...", ...], "image_id": ...}, ...]`
* official COCO captions: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`

Entries showing the same image (the same `image_id`, or the same path when there is none) are merged into
one, their captions united: a file with one caption per entry (LAVIS's training format) and a list of
captions per entry describe the same data. An image id used for two paths, or a path under two ids, is refused.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from stages.data.images import OUTSIDE_ROOT_HINT, escapes_root

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and the entry."""


@dataclass
class Entry:
    image: str  # path relative to the image root, normalised ("a/./b.jpg" and "a//b.jpg" are "a/b.jpg")
    captions: list[str]
    image_id: str  # the id as text: what entries of one image share
    source_id: object = None  # the id as the file wrote it (an int for COCO), for result files; None without one


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
    entries = without_empty_captions(entries, path)
    if not entries:
        raise AnnotationError(f"{path}: no entries (with a caption that is not empty)")
    if not allow_outside_root:
        for i, entry in enumerate(entries):
            if escapes_root(entry.image):
                raise AnnotationError(f"{path}: entry {i}: image path {entry.image!r} leads outside the image root; "
                                      f"annotation paths are relative to it ({OUTSIDE_ROOT_HINT})")
    return group_by_image(entries, path)


def without_empty_captions(entries: list[Entry], source: Path) -> list[Entry]:
    """Drop captions that are empty or blank (and entries left without one), saying how many."""
    kept, dropped = [], 0
    for entry in entries:
        captions = [c for c in entry.captions if c.strip()]
        dropped += len(entry.captions) - len(captions)
        if captions:
            kept.append(Entry(entry.image, captions, entry.image_id, entry.source_id))
    if dropped:
        log.warning("%s: %d empty caption(s) dropped (%d entries left without a caption)", source, dropped, len(entries) - len(kept))
    return kept


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
            by_id[entry.image_id] = Entry(entry.image, list(dict.fromkeys(entry.captions)), entry.image_id, entry.source_id)
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
    image = posixpath.normpath(item["image"])
    if item.get("image_id") is None:
        return Entry(image, captions, image)
    return Entry(image, captions, _image_id(where, item["image_id"]), item["image_id"])


def _coco_entries(path: Path, data: dict) -> list[Entry]:
    if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
        raise AnnotationError(f"{path}: 'images' and 'annotations' must be lists")
    files, source_ids = {}, {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise AnnotationError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        image_id = _image_id(f"{path}: images[{i}]", image["id"])
        source_ids[image_id] = image["id"]
        if files.setdefault(image_id, posixpath.normpath(image["file_name"])) != posixpath.normpath(image["file_name"]):
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
    return [Entry(files[i], c, i, source_ids[i]) for i, c in captions.items()]
