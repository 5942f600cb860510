"""The image index that `qformer index` writes and `qformer search` / `qformer serve` read: its format, its updates,
and the model it belongs to.

An index is a folder, written whole or not at all (`qformer.files.atomic_folder`):

* `image_feats.npy`: (images, queries, width) fp16, the ITC features of every readable image (what ITC ranks);
* `qformer_index.json`, written last: the format, the model it was built with (its folder and the sha256 of its
  weights, frozen encoder included), and per image its path (its folder's symlinks resolved), size and
  modification time (row i of the array is image i), with `names_sha256`, the checksum of those paths in row order
  (a manifest whose entries were reordered is refused, not read wrongly); the unreadable files with their reasons.

A damaged index (unreadable manifest or features, rows and images that do not match) is named in one line with
the command that rebuilds it (`qformer index ... --rebuild`).

Updating and writing an index is `stages.apps.index_update`.

The ITM re-rank (`--rerank K`) reads the top K images again and encodes them: storing the image encoder's tokens
would cost 723 KB per image with ViT-g, re-encoding K images costs K encoder passes. An image changed or removed
since it was indexed is left out of a re-rank, with a note.

Indexing again adds new files, drops the ones no longer under the folders and recomputes those whose size or
modification time changed; an unchanged unreadable file is not read again. An index built with another model is
refused (features of two models cannot be compared).
"""

from __future__ import annotations

import hashlib
import json as json_io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from stages.data.images import ImageReader, UnreadableImage

MANIFEST = "qformer_index.json"  # written last: a folder without it is not an index


FEATURES = "image_feats.npy"


FORMAT = {"format": "qformer-image-index", "version": 1}


# --- the model an index belongs to ------------------------------------------------------------------------------
def model_identity(model, folder: str | Path) -> dict:
    """What an index's features depend on: the model's weights (frozen encoder included) and its input size.

    The hash comes from the export's marker; an export written before exports recorded it is hashed here (once a command).
    """
    from qformer.files import weights_sha256
    from qformer.folders import recorded_weights_sha256

    sha = recorded_weights_sha256(folder) or weights_sha256(model)
    return {"folder": str(Path(folder).resolve()), "weights_sha256": sha,
            "image_size": model.config.vision_config.image_size}


def _short(sha: str) -> str:
    return sha[:12] + "..."


@dataclass
class FileStamp:
    """A file as the index saw it: a file whose size or modification time changed is read again."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        """None when the file cannot even be looked at (a broken link, a loop): it is always read again."""
        try:
            stat = path.stat()
        except (OSError, ValueError):
            return None
        return cls(str(path), stat.st_size, stat.st_mtime_ns)


def names_sha256(images: list[FileStamp]) -> str:
    """The checksum of the image paths in row order: a manifest whose entries were reordered gives another."""
    return hashlib.sha256("\n".join(image.path for image in images).encode("utf-8", "surrogateescape")).hexdigest()


# --- reading ------------------------------------------------------------------------------------------------
@dataclass
class Hit:
    """One search result: `score` orders them (the ITC similarity, or ITM logit + ITC similarity when re-ranked).

    `rank` is 0 until the final order is known."""

    rank: int
    path: str
    score: float
    itc: float
    itm_probability: float | None = None


class ImageIndex:
    """A finished index folder: its manifest, and its features in memory."""

    def __init__(self, folder: str | Path, option: str = "--index"):
        self.folder = Path(folder)
        self.option = option
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{option}: index folder not found: {self.folder}")
        if not (self.folder / MANIFEST).is_file():
            raise ValueError(f"{option}: {self.folder} is not a qformer index (no {MANIFEST}); make one with qformer index")
        self.manifest = self._read_manifest()
        try:
            self.images = [FileStamp(**entry) for entry in self.manifest["images"]]
            self.skipped = {entry["path"]: (FileStamp(entry["path"], entry["size"], entry["mtime_ns"]), entry["reason"])
                            for entry in self.manifest["skipped"]}
            if not {"folder", "weights_sha256", "image_size"} <= set(self.manifest["model"]):
                raise KeyError("model")
        except (KeyError, TypeError) as error:
            raise self.damaged(MANIFEST, f"not a complete index manifest ({type(error).__name__}: {error})") from None
        self.image_feats = self._read_features() if self.images else None  # 16 KB per image with ViT-g

    def damaged(self, name: str, what: str) -> ValueError:
        """One line: the file, what is wrong with it, and the command that rebuilds the index."""
        return ValueError(f"{self.option}: {self.folder / name}: {what}; rebuild the index: qformer index --model MODEL "
                          f"FOLDER... --out {self.folder} --rebuild")

    def _read_manifest(self) -> dict:
        try:
            manifest = json_io.loads((self.folder / MANIFEST).read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise self.damaged(MANIFEST, f"not valid JSON ({error})") from None
        if not isinstance(manifest, dict) or {k: manifest.get(k) for k in FORMAT} != FORMAT:
            raise self.damaged(MANIFEST, f"not a qformer index manifest of version {FORMAT['version']}")
        return manifest

    def _read_features(self) -> torch.Tensor:
        """The feature array, checked against the manifest: its rows, and the checksum of the names in row order."""
        path = self.folder / FEATURES
        if not path.is_file():
            raise self.damaged(FEATURES, f"missing (the manifest lists {len(self.images)} images)")
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:  # numpy says "pickled data" of any foreign header: not a hint to follow
            what = "truncated" if "not fully written" in str(error) or isinstance(error, EOFError) else "not a numpy .npy array"
            raise self.damaged(FEATURES, f"{what} (written by an interrupted or foreign program?)") from None
        if array.ndim != 3 or array.dtype != np.float16:
            raise self.damaged(FEATURES, f"an array of {array.dtype} {array.shape}, not (images, queries, width) float16")
        if len(array) != len(self.images):
            raise self.damaged(FEATURES, f"{len(array)} rows, but {MANIFEST} lists {len(self.images)} images")
        recorded = self.manifest.get("names_sha256")  # absent in indexes written before it was recorded
        if recorded is not None and recorded != names_sha256(self.images):
            raise self.damaged(MANIFEST, f"the images are not listed in the order of the rows of {FEATURES} "
                                         "(names_sha256 differs: the manifest was edited)")
        return torch.from_numpy(array)

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def built_with(self) -> str:
        """The stage-1 export folder the index was built with, where it still is."""
        folder = self.model["folder"]
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{self.option}: the model the index was built with is no longer at {folder}; "
                                    "give its new place with --model DIR")
        return folder

    def check_model(self, identity: dict, option: str) -> None:
        """Refuse another model: its features are not comparable with this index's."""
        if identity["weights_sha256"] != self.model["weights_sha256"] or identity["image_size"] != self.model["image_size"]:
            raise ValueError(f"{option}: the index {self.folder} was built with another model ({self.model['folder']}, weights "
                             f"{_short(self.model['weights_sha256'])}); {identity['folder']} has weights "
                             f"{_short(identity['weights_sha256'])}: build a new index with this model (another --out)")

    def search(self, model, tokenizer, text: str, k: int = 10, rerank: int = 0, reader: ImageReader | None = None) -> list[Hit]:
        """The top `k` images for `text` by ITC; with `rerank` K, the top K re-ranked by ITM (+ ITC) come first.

        An image that changed or disappeared since it was indexed is left out of the re-rank (named by `reader`).
        """
        from qformer.retrieval import itc_similarity

        if k < 1 or rerank < 0:
            raise ValueError(f"--k must be at least 1 and --rerank at least 0, got {k} and {rerank}")
        if not self.images:
            raise ValueError(f"{self.option}: the index {self.folder} holds no readable image")
        check_query(text)
        input_ids, attention_mask = tokenize(model, tokenizer, text)
        with torch.no_grad():
            sim = itc_similarity(self.image_feats, model.text_feat(input_ids, attention_mask))[:, 0]  # (I,)
        top = sim.topk(min(max(k, rerank), len(sim))).indices.tolist()
        hits = [Hit(0, self.images[i].path, float(sim[i]), float(sim[i])) for i in top]
        if rerank:
            hits = self._rerank(model, hits[:rerank], input_ids, attention_mask, reader or ImageReader()) + hits[rerank:]
        return [replace(hit, rank=rank) for rank, hit in enumerate(hits[:k], 1)]

    def _rerank(self, model, hits: list[Hit], input_ids, attention_mask, reader: ImageReader) -> list[Hit]:
        from qformer.retrieval import image_features, match_scores
        from qformer.transforms import eval_transform

        stamps = {s.path: s for s in self.images}
        current = [h for h in hits if _unchanged(stamps[h.path], reader)]
        pixels, kept = reader.load([h.path for h in current], eval_transform(model.config.vision_config.image_size))
        if pixels is None:
            return []
        device = input_ids.device
        image_embeds, image_feats = image_features(model, pixels.to(device))
        logits, itc = match_scores(model, image_embeds, image_feats, input_ids, attention_mask)
        probability = logits.softmax(-1)[:, 1]
        scored = [Hit(0, current[i].path, float(logits[row, 1] + itc[row]), float(itc[row]), float(probability[row]))
                  for row, i in enumerate(kept)]
        return sorted(scored, key=lambda h: -h.score)


def _unchanged(stamp: FileStamp, reader: ImageReader) -> bool:
    if FileStamp.of(Path(stamp.path)) == stamp:
        return True
    reader.skipped.add(UnreadableImage(stamp.path, "changed or removed since it was indexed (run qformer index again); "
                                                   "left out of the re-rank"))
    return False


def check_query(text: str) -> None:
    """A query must be text with words: bytes that are not UTF-8 (a Latin-1 shell hands them over as surrogates) or
    an empty query would be ranked as if they were words."""
    from stages.data.annotations import clean_caption

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        try:
            shown = repr(text.encode("utf-8", "surrogateescape"))  # the bytes as given: b'caf\xe9'
        except UnicodeEncodeError:
            shown = ascii(text)
        raise ValueError(f"the query {shown} is not UTF-8 (character {error.start + 1}): give it in UTF-8, e.g. "
                         "from a UTF-8 terminal (LANG=C.UTF-8) or converted with iconv -t UTF-8") from None
    if not clean_caption(text):
        raise ValueError(f"the query {text!r} has no words to look for: give a description, e.g. 'a red car'")


def tokenize(model, tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A query as the model's texts were trained: cleaned as captions are, padded to the model's text length."""
    from stages.data.annotations import clean_caption

    device = next(model.parameters()).device
    tokens = tokenizer([clean_caption(text)], padding="max_length", truncation=True, max_length=model.config.max_text_length,
                       return_tensors="pt")
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
