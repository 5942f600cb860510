"""`qformer index` and `qformer search`: text-to-image search over a photo folder with a stage-1 model
(the index format is `stages.apps.image_index`)."""

from __future__ import annotations

import json as json_io
import os
import sys
from dataclasses import asdict
from pathlib import Path

from stages.apps.image_index import Hit, ImageIndex, model_identity
from stages.apps.index_update import check_index_out, compute_features, plan_update, write_index
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_SUFFIXES, ImageReader, UnreadableImage, image_files


def index(
    folders: list[str],
    *,
    model: str,
    out: str,
    batch_size: int = 32,
    device: str = "cpu",
    no_progress: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    rebuild: bool = False,
) -> int:
    """Index the images under folders for text search with a stage-1 model (`qformer search`, `qformer serve`).

    Run it again to update the index: new files are added, files no longer under the folders dropped and changed
    ones (size or modification time) read again. Unreadable files are named and left out, never fatal.

    Args:
        folders: folders searched recursively for .jpg .jpeg .png .bmp .gif .tif .tiff .webp (or single image files).
        model: a stage-1 export folder.
        out: the index folder (made, or updated when it is an index of the same model).
        batch_size: images per batch.
        device: cpu, cuda or cuda:N.
        no_progress: no progress bar.
        max_image_pixels: skip images whose header declares more pixels, before decoding.
        rebuild: read every image again and replace the index at --out as a whole (a damaged one too).
    """
    from qformer.files import atomic_folder
    from qformer.folders import load_stage1
    from stages.distributed import device_for

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    for folder in folders:
        if not Path(folder).exists() and not Path(folder).is_symlink():
            raise FileNotFoundError(f"folder not found: {folder}")
    out_path = Path(out)
    old = check_index_out(out_path, rebuild)
    files = unique_real_paths(image_files(folders))
    if not files:
        raise ValueError("no image files under " + ", ".join(folders) + " (searched for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    stage1, _ = load_stage1(model)
    identity = model_identity(stage1, model)
    if old is not None:
        old.check_model(identity, "--out")
    plan = plan_update(files, old)
    reader = ImageReader(max_image_pixels)
    for path, (stamp, reason) in plan.still_unreadable.items():
        reader.skipped.add(UnreadableImage(path, f"{reason} (unchanged since the last run)"))
    computed = compute_features(stage1.to(device_for(device, 0)), plan.to_read, reader, batch_size, not no_progress)
    rows, skipped = plan.rows(computed, old), plan.unreadable(reader)
    with atomic_folder(out_path, overwrite=True) as folder:
        write_index(folder, identity, rows, skipped)
    reader.skipped.finish()
    print(f"{out}: {len(rows)} images ({len(computed)} read, {len(plan.reused)} unchanged, {plan.dropped} dropped), "
          f"{len(skipped)} unreadable")
    return 0


def unique_real_paths(files: list[Path]) -> list[Path]:
    """Absolute paths with their folders resolved, each once: a folder given directly and through a symlink (or
    twice) is indexed once. The file name itself is kept: a symlinked file is listed under the name it was given."""
    return list(dict.fromkeys(Path(os.path.realpath(p.parent)) / p.name for p in files))


# --- showing results ------------------------------------------------------------------------------------------
def printable(path: str) -> str:
    """A path on one line: a newline or another control character becomes an escape (\\n, \\x1b), as do bytes
    that are not UTF-8 (\\xe9); printable text, accented letters included, is kept."""
    def escaped(char: str) -> str:
        if "\udc80" <= char <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
            return f"\\x{ord(char) - 0xDC00:02x}"
        return char.encode("unicode_escape").decode("ascii")

    return "".join(char if char.isprintable() else escaped(char) for char in path)


def print_hits(hits: list[Hit]) -> None:
    for hit in hits:
        itm = "" if hit.itm_probability is None else f"  (itc {hit.itc:.4f}, itm {hit.itm_probability:.3f})"
        print(f"{hit.rank:>3}  {hit.score:.4f}  {printable(hit.path)}{itm}")


def explain_shortfall(hits: list[Hit], k: int, rerank: int, index_size: int) -> None:
    """Fewer results than asked: say why (only images that changed since indexing are left out)."""
    expected = min(k, index_size)
    if len(hits) < expected:
        print(f"showing {len(hits)} of {expected}: {expected - len(hits)} of the top {rerank} changed or were removed since "
              "the index was built and were left out of the re-rank; run qformer index again", file=sys.stderr)


def hit_label(hit: Hit) -> str:
    itm = "" if hit.itm_probability is None else f"  itm {hit.itm_probability:.2f}"
    return f"{hit.rank}. {hit.score:.3f}{itm}  {Path(hit.path).name}"


def thumbnail(path: str, side: int, reader: ImageReader):
    """The image scaled (up or down) to fit side x side, or None when it cannot be read now."""
    from PIL import ImageOps

    try:
        image = reader.open(path)
    except UnreadableImage as error:
        reader.skipped.add(error)
        return None
    return ImageOps.contain(image, (side, side))


def contact_sheet(hits: list[Hit], reader: ImageReader, columns: int = 5, side: int = 160):
    """The results as one picture: thumbnails in rank order, each with its rank, score and file name."""
    from PIL import Image, ImageDraw

    label_height = 28
    rows = (len(hits) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * side, rows * (side + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, hit in enumerate(hits):
        x, y = (i % columns) * side, (i // columns) * (side + label_height)
        image = thumbnail(hit.path, side - 8, reader)
        if image is None:
            draw.rectangle((x + 4, y + 4, x + side - 4, y + side - 4), fill=(220, 220, 220))
            draw.text((x + 10, y + side // 2), "unreadable now", fill="black")
        else:
            sheet.paste(image, (x + (side - image.width) // 2, y + (side - image.height) // 2))
        name = Path(hit.path).name
        draw.text((x + 4, y + side), f"{hit.rank}. {hit.score:.3f}", fill="black")
        draw.text((x + 4, y + side + 13), name if len(name) <= 24 else name[:21] + "...", fill=(80, 80, 80))
    return sheet


def search(
    text: str,
    *,
    index: str,
    k: int = 10,
    rerank: int = 0,
    model: str | None = None,
    json: bool = False,
    grid: str | None = None,
    device: str = "cpu",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> int:
    """The images of an index (qformer index) that best match a text: top k by ITC, optionally re-ranked with ITM.

    Prints rank, score and path per image (or JSON). The score is the ITC similarity, or for re-ranked images the
    ITM logit plus the ITC similarity (as LAVIS ranks), with the ITM match probability.

    Args:
        text: what to look for, in words.
        index: an index folder made by qformer index.
        k: how many images to show.
        rerank: re-rank the top K by ITC with ITM (reads those K images again); 0: ITC only.
        model: the stage-1 export to use (default: the folder the index was built with; must have the same weights).
        json: print a JSON list of {"rank", "path", "score", "itc", "itm_probability"}.
        grid: also write a contact sheet of the results (PNG) to this file.
        device: cpu, cuda or cuda:N.
        max_image_pixels: skip images whose header declares more pixels, before decoding (re-rank, grid).
    """
    from qformer.folders import load_stage1
    from stages.distributed import device_for
    from stages.outputs import check_output_files

    check_output_files(grid=grid)
    image_index = ImageIndex(index)
    model = model or image_index.built_with()
    stage1, tokenizer = load_stage1(model)
    image_index.check_model(model_identity(stage1, model), "--model")
    reader = ImageReader(max_image_pixels)
    hits = image_index.search(stage1.to(device_for(device, 0)), tokenizer, text, k, rerank, reader)
    if json:
        print(json_io.dumps([asdict(hit) for hit in hits], indent=2))
    else:
        print_hits(hits)
    explain_shortfall(hits, k, rerank, len(image_index.images))
    if grid:
        contact_sheet(hits, reader).save(grid)
    reader.skipped.finish()
    return 0
