"""Writing the image index (`stages.apps.image_index` describes the format): what an update reuses, reads again
and drops, the features of the images read, and the files of the folder, the manifest last."""

from __future__ import annotations

import json as json_io
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stages.apps.image_index import FEATURES, FORMAT, MANIFEST, FileStamp, ImageIndex, names_sha256
from stages.data.images import ImageReader


# --- writing ------------------------------------------------------------------------------------------------
def check_index_out(out: Path, rebuild: bool = False) -> ImageIndex | None:
    """The index to update at `out`, None for a new one (or one rebuilt: the old one, damaged maybe, is not read).

    A folder with other files is refused before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / MANIFEST).is_file() and not (rebuild and (out / FEATURES).is_file()):
        raise ValueError(f"--out {out}: a folder with other files, not a qformer index (no {MANIFEST}); give a new or empty folder")
    return None if rebuild else ImageIndex(out, "--out")


@dataclass
class IndexPlan:
    """What an update does: rows kept from the old index, files to read, unreadable files not read again."""

    reused: dict[str, tuple[FileStamp, int]]  # path -> (stamp, row in the old index)
    to_read: list[tuple[Path, FileStamp | None]]
    still_unreadable: dict[str, tuple[FileStamp, str]]
    dropped: int

    def rows(self, computed: dict[str, tuple[FileStamp, np.ndarray]], old: ImageIndex | None) -> list[tuple[FileStamp, np.ndarray]]:
        """The new index's rows, sorted by path: features just computed, or kept from the old index."""
        def row(path: str) -> tuple[FileStamp, np.ndarray]:
            if path in computed:
                return computed[path]
            stamp, old_row = self.reused[path]
            return stamp, old.image_feats[old_row].numpy()

        return [row(path) for path in sorted(set(self.reused) | set(computed))]

    def unreadable(self, reader: ImageReader) -> list[tuple[FileStamp, str]]:
        """Every unreadable file with its reason: those not read again, and those `reader` failed on now."""
        now = [(FileStamp.of(Path(path)) or FileStamp(path, -1, -1), reason)  # -1: a file that cannot be looked at
               for path, reason in reader.skipped.reasons.items() if path not in self.still_unreadable]
        return list(self.still_unreadable.values()) + now


def plan_update(files: list[Path], old: ImageIndex | None) -> IndexPlan:
    old_rows = {stamp.path: (stamp, row) for row, stamp in enumerate(old.images)} if old else {}
    old_skipped = old.skipped if old else {}
    reused, to_read, still_unreadable = {}, [], {}
    for path in files:
        stamp = FileStamp.of(path)
        if stamp is not None and old_rows.get(str(path), (None,))[0] == stamp:
            reused[str(path)] = old_rows[str(path)]
        elif stamp is not None and old_skipped.get(str(path), (None,))[0] == stamp:
            still_unreadable[str(path)] = old_skipped[str(path)]
        else:
            to_read.append((path, stamp))
    current = {str(p) for p in files}
    dropped = sum(p not in current for p in list(old_rows) + list(old_skipped))
    return IndexPlan(reused, to_read, still_unreadable, dropped)


@torch.no_grad()
def compute_features(model, files: list[tuple[Path, FileStamp | None]], reader: ImageReader, batch_size: int,
                     show_progress: bool) -> dict[str, tuple[FileStamp, np.ndarray]]:
    """{path: (stamp, ITC features (Q, E) fp16)} of every readable file; the unreadable ones are named by `reader`."""
    from tqdm import tqdm

    from qformer.retrieval import image_features
    from qformer.transforms import eval_transform

    device = next(model.parameters()).device
    transform = eval_transform(model.config.vision_config.image_size)
    features = {}
    with tqdm(total=len(files), desc="indexing", unit="image", disable=not show_progress, file=sys.stderr) as bar:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            pixels, kept = reader.load([path for path, _ in batch], transform)
            if pixels is not None:
                _, image_feats = image_features(model, pixels.to(device))
                for row, i in enumerate(kept):
                    path, stamp = batch[i]
                    features[str(path)] = (stamp or FileStamp.of(path), image_feats[row].cpu().half().numpy())
            bar.update(len(batch))
    return features


def write_index(folder: Path, identity: dict, rows: list[tuple[FileStamp, np.ndarray]], skipped: list[tuple[FileStamp, str]]) -> None:
    """The files of an index into the (temporary) `folder`, the manifest last."""
    if rows:
        array = np.lib.format.open_memmap(folder / FEATURES, mode="w+", dtype=np.float16, shape=(len(rows), *rows[0][1].shape))
        for i, (_, feats) in enumerate(rows):
            array[i] = feats
        array.flush()
        del array
    stamps = [stamp for stamp, _ in rows]
    manifest = {**FORMAT, "model": identity, "names_sha256": names_sha256(stamps), "images": [asdict(stamp) for stamp in stamps],
                "skipped": [{**asdict(stamp), "reason": reason} for stamp, reason in skipped]}
    (folder / MANIFEST).write_text(json_io.dumps(manifest, indent=1) + "\n")
