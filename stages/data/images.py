"""Reading images from files nobody checked: one loader for training, evaluation and captioning.

Every way a file can fail — missing, empty, truncated, not an image, too many pixels, outside the image
root — becomes `UnreadableImage`, which names the file and the reason. Callers skip the sample, count it
and name it once (`SkippedImages`); a run never dies on one bad file.

The pixel count is checked from the header, before anything is decoded: a 109 KB PNG can declare
30000 x 30000 pixels and decode to gigabytes.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is broken, not silently grey

# 50 megapixels: a 50 MP camera photo still loads; Pillow's own limit (89 MP warning, 179 MP error) is higher.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
OUTSIDE_ROOT_HINT = "pass --allow-outside-root (data.allow_outside_root: true) to read it"


class UnreadableImage(OSError):
    """An image file that cannot be used; `path` and `reason` say which and why."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_rgb(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode any image file as 8-bit RGB (gray, palette, CMYK, alpha on white and 16-bit included).

    Raises `UnreadableImage` for every failure. `max_pixels` (None: no limit of ours) is checked against the
    header's width x height before decoding. Only regular files are opened: a FIFO or a device would block.
    """
    _check_regular_file(path)
    return decode_rgb(path, path, max_pixels)


def decode_rgb(source, path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """`read_rgb` of a file or of a file-like object (an image inside a tar shard); `path` names it in errors."""
    if max_pixels is not None and max_pixels > (Image.MAX_IMAGE_PIXELS or 0) and Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels  # the user asked for more than Pillow allows: raise Pillow's bomb limit too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            with Image.open(source) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise UnreadableImage(path, f"{width}x{height} = {width * height:,} pixels is over the limit of "
                                                f"{max_pixels:,} (max_image_pixels)")
                image.load()
                return _to_rgb(image)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as error:  # over twice Pillow's own limit: refused by Image.open itself
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        count = f"{int(pixels.group(1)):,} pixels" if pixels else "the pixel count"
        raise UnreadableImage(path, f"{count} is over the limit of {max_pixels or Image.MAX_IMAGE_PIXELS:,} (max_image_pixels)") from None
    except Exception as error:  # decoders of hostile files raise many types (OSError, SyntaxError, struct.error, ...)
        if getattr(error, "strerror", None):  # an OSError from the file system: its words, without the path again
            raise UnreadableImage(path, error.strerror.lower()) from None
        reason = (str(error) or type(error).__name__).replace(f" '{path}'", "").replace(str(path), "the file")
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", reason)  # an image inside a shard
        if _size(source) == 0:
            reason = "empty file"
        raise UnreadableImage(path, reason) from None


def _size(source) -> int:
    return source.getbuffer().nbytes if hasattr(source, "getbuffer") else Path(source).stat().st_size


def _check_regular_file(path: str | Path) -> None:
    """Refuse what is not a regular file (missing, a folder, a FIFO, a device, a link that leads nowhere) by name."""
    try:
        mode = os.stat(path).st_mode  # follows symbolic links
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found" if not os.path.islink(path) else "symbolic link to a missing file") from None
    except (OSError, ValueError) as error:  # a symbolic link loop (ELOOP), a NUL byte in the name, ...
        raise UnreadableImage(path, getattr(error, "strerror", None) or str(error)) from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise UnreadableImage(path, f"{kind}, not an image file")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v * (1 / 256)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def check_pixel_limit(max_pixels: int | None, option: str = "--max-image-pixels") -> None:
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"{option} must be a positive number of pixels (or unset for no limit), got {max_pixels}")


# --- image roots ----------------------------------------------------------------------------------------------
def escapes_root(relative: str) -> bool:
    """True for an annotation path that names a file outside its image root without looking at the disk."""
    path = Path(relative)
    if path.is_absolute():
        return True
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return True
    return False


def image_under_root(root: Path, relative: str, allow_outside_root: bool = False) -> Path:
    """`root / relative`, refused (UnreadableImage) when it leads out of `root`, symbolic links followed."""
    path = root / relative
    if allow_outside_root:
        return path
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except RuntimeError:  # Python 3.11's Path.resolve on a loop
        raise UnreadableImage(path, "too many levels of symbolic links (a link loop)") from None
    except (OSError, ValueError) as error:  # a NUL byte in the name, ...
        raise UnreadableImage(path, getattr(error, "strerror", None) or str(error) or "cannot be resolved") from None
    if not inside:
        raise UnreadableImage(path, f"leads outside the image root {root} ({OUTSIDE_ROOT_HINT})")
    return path


# --- skipping and reporting ---------------------------------------------------------------------------------
def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


class SkippedImages:
    """The unreadable images of a run: each counted, and named once (on stderr unless told otherwise).

    Past `shown` names the rest are only counted, and `finish()` says how many more there were: a wrong
    `--images` folder gives one screen of names, not one line per image.
    """

    def __init__(self, report: Callable[[str], None] | None = None, shown: int = 20):
        self.reasons: dict[str, str] = {}
        self.report = report or _to_stderr
        self.shown = shown

    def add(self, error: UnreadableImage) -> None:
        if error.path not in self.reasons:
            self.reasons[error.path] = error.reason
            if len(self.reasons) <= self.shown:
                self.report(f"skipping {error.path}: {error.reason}")

    def finish(self, total: int | None = None) -> None:
        """Say how many unreadable images were not named (`total`: the count over every process)."""
        hidden = (len(self) if total is None else total) - min(len(self), self.shown)
        if hidden > 0:
            self.report(f"... and {hidden} more unreadable image(s) not listed")

    def __len__(self) -> int:
        return len(self.reasons)

    def __contains__(self, path: str) -> bool:
        return str(path) in self.reasons


@dataclass
class ImageReader:
    """How a command reads its images: the pixel limit, the root they must stay inside, and what was skipped."""

    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    root: Path | None = None  # paths are relative to it, and may not lead out of it ...
    allow_outside_root: bool = False  # ... unless this is set
    skipped: SkippedImages = field(default_factory=SkippedImages)

    def __post_init__(self):
        check_pixel_limit(self.max_pixels)

    def path(self, path: str | Path) -> Path:
        """The file an annotation path names (`UnreadableImage` when it leads out of the root)."""
        return Path(path) if self.root is None else image_under_root(self.root, str(path), self.allow_outside_root)

    def open(self, path: str | Path) -> Image.Image:
        """One image as RGB; `UnreadableImage` (not counted here) when it cannot be used."""
        return read_rgb(self.path(path), self.max_pixels)

    def load(self, paths: Sequence[str | Path], transform) -> tuple[torch.Tensor | None, list[int]]:
        """Decode and transform a batch of images once: (stacked pixels or None, indices of the readable ones)."""
        pixels, kept = [], []
        for i, path in enumerate(paths):
            try:
                pixels.append(transform(self.open(path)))
                kept.append(i)
            except UnreadableImage as error:
                self.skipped.add(error)
        return (torch.stack(pixels) if pixels else None), kept


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files given on a command line: files as they are, folders searched recursively by suffix."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            # not only regular files: a broken link or a FIFO named like an image is named when it is read
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        else:
            paths.append(item)  # a missing file is named when it is read
    return paths
