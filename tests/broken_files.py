"""Broken and hostile image files, as users' folders and web crawls contain them."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, side: int = 30000, valid: bool = True) -> Path:
    """A 1-bit black PNG of side x side pixels: ~110 KB on disk for 30000 x 30000, gigabytes once decoded.

    With `valid=False` the pixel data is cut short, so only a reader that decodes it would notice.
    """
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side if valid else 10)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    return path


def write_broken_images(folder: Path) -> dict[str, Path]:
    """The four kinds every command must survive: truncated JPEG, zero bytes, text named .jpg, decompression bomb."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, "JPEG", quality=90)
    files = {
        "truncated": folder / "truncated.jpg",
        "empty": folder / "empty.jpg",
        "text": folder / "text.jpg",
    }
    files["truncated"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    files["bomb"] = write_png_bomb(folder / "bomb.png")
    return files
