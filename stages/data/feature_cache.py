"""The frozen-feature cache: the image encoder runs once per image and view, training and evaluation read its output.

`qformer cache-features` (`stages.tools.cache_features`) stores the frozen encoder's patch tokens, taken *before* `ln_vision` (which trains), for
every image of one or more annotation files:

* views: view 0 is the eval view (`eval_transform`); with `--views V` and V > 1, views 1..V are V training views drawn
  with `train_transform` (random resized crop + flip, with the settings recorded). `--views 1` stores the eval view
  only, and training then uses it.
* storage: numpy `.npy` files, read with `np.load(mmap_mode="r")`. Each part `features-NNNNN.npy` is
  (images, views, tokens, width); bf16 is stored as uint16 and read back with `.view(torch.bfloat16)` (numpy has no
  bf16). `.npy` rather than safetensors because a part is written row by row into a memory-mapped file
  (`open_memmap`): nothing is held in memory, an interrupted run loses at most one part, and any row is read
  lazily (one DataLoader worker opens its own maps) with no dependency beyond numpy.
* `feature_cache.json`, the manifest, is written last and atomically. It records the encoder (timm name, sha256 of
  its pruned weights, image size, drop_last_blocks, width), the transforms, views, dtype, token shape, and every
  image (normalised relative path + image id) with those that could not be read. A folder without it is an
  interrupted cache: readers refuse it and the same command resumes it (finished parts are kept).

A model whose encoder differs from the cache's is refused, naming the field; an image the cache could not read is
named once when caching and its samples are skipped and counted (as unreadable images are) when training from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qformer.files import weights_sha256
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, SkippedImages, UnreadableImage
from stages.data.instructions import sample_text
from stages.data.sampling import sample_key, sample_rng

MANIFEST = "feature_cache.json"  # written last: a folder without it is not (yet) a cache
SETTINGS = "cache_settings.json"  # written first: what an interrupted run was making, to resume it
FORMAT = {"format": "qformer-feature-cache", "version": 2}  # 2: the .npy files are "parts" (version 1 said "shards")
STORAGE = {"fp16": ("float16", torch.float16), "bf16": ("uint16", torch.bfloat16), "fp32": ("float32", torch.float32)}
ENCODER_FIELDS = ("model_name", "image_size", "drop_last_blocks", "width", "weights_sha256")  # checked in this order
EVAL_VIEW = 0


# --- the encoder's identity -------------------------------------------------------------------------------
def encoder_identity(encoder) -> dict:
    """What a cache's features depend on: a model whose encoder differs in any of these is refused."""
    config = encoder.config
    return {"model_name": config.model_name, "weights_sha256": weights_sha256(encoder.model), "image_size": config.image_size,
            "drop_last_blocks": config.drop_last_blocks, "width": encoder.width}


def load_encoder(config: str, seed: int = 0, vision_weights: str | None = None):
    """The frozen encoder of a model config (preset or file) or of an export folder, built as a training run builds it.

    A randomly initialised encoder (no weights file) depends on the seed: `seed_everything(seed)` runs first, as
    `qformer stage1 fit --seed_everything SEED` does before it builds the model (the encoder is its first module).
    """
    from lightning_fabric.utilities.seed import seed_everything

    from qformer.config import resolve_config
    from qformer.folders import read_config, read_export_info
    from qformer.vision import FrozenImageEncoder

    if Path(config).is_dir():
        read_export_info(config)  # a folder must be an export
        vision = read_config(config).vision_config
    else:
        vision = resolve_config(config).vision_config
    if vision_weights is not None:
        vision.weights_path = vision_weights
    seed_everything(seed, verbose=False)
    return FrozenImageEncoder(vision)


# --- reading ------------------------------------------------------------------------------------------------
class FeatureCache:
    """A finished cache folder: its manifest, and its parts opened lazily (per process, so per DataLoader worker)."""

    def __init__(self, folder: str | Path, option: str = "--features"):
        self.folder = Path(folder)
        self.option = option
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{option}: feature cache folder not found: {self.folder}")
        if not (self.folder / MANIFEST).is_file():
            if (self.folder / SETTINGS).is_file():
                command = read_cache_file(self.folder / SETTINGS).get("command", "qformer cache-features ...")
                raise ValueError(f"{option}: {self.folder} is an incomplete feature cache (caching was interrupted); "
                                 f"rerun the command that made it to resume: {command}")
            raise ValueError(f"{option}: {self.folder} is not a feature cache (no {MANIFEST}); make one with qformer cache-features")
        self.manifest = read_cache_file(self.folder / MANIFEST)
        if self.manifest.get("format") == FORMAT["format"] and self.manifest.get("version") == 1:
            self.manifest["version"], self.manifest["parts"] = 2, self.manifest.pop("shards", [])  # same files, older word
        if {k: self.manifest.get(k) for k in FORMAT} != FORMAT:
            raise ValueError(f"{option}: {self.folder / MANIFEST}: not a feature cache manifest of version {FORMAT['version']}")
        self.index: dict[str, tuple[int, int]] = {}  # image path -> (part, row)
        for part, info in enumerate(self.manifest["parts"]):
            for row in range(info["images"]):
                self.index[self.manifest["images"][info["start"] + row]["image"]] = (part, row)
        self.skipped: dict[str, str] = self.manifest["skipped"]
        self.train_views = self.manifest["views"]["train"]
        self._arrays: dict[int, np.ndarray] = {}
        for part in range(len(self.manifest["parts"])):
            self._part(part)  # a damaged part is named now, not by a DataLoader worker halfway through an epoch

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}  # a worker opens its own memory maps (a pickled map would copy the data)

    @property
    def views(self) -> list[int]:
        """The views training draws from: the training views, or the eval view when there are none."""
        return list(range(1, self.train_views + 1)) if self.train_views else [EVAL_VIEW]

    def check_encoder(self, encoder) -> None:
        """Refuse a model whose frozen encoder is not the one the cache was made with, naming the first field that differs."""
        cached, current = self.manifest["encoder"], encoder_identity(encoder)
        for name in ENCODER_FIELDS:
            if cached[name] != current[name]:
                hint = (" (a randomly initialised encoder depends on the seed: make the cache with cache-features --seed S for a "
                        "run with --seed_everything S)" if name == "weights_sha256" and encoder.config.weights_path is None else "")
                raise ValueError(f"{self.option}: the cache {self.folder} was made with another image encoder: {name} is "
                                 f"{_short(cached[name])} there, {_short(current[name])} in this model; rerun qformer "
                                 f"cache-features with this model's config{hint}")

    def check_transform(self, hflip: bool, crop_scale, image_size: int) -> None:
        """The run's data settings must say what training from this cache sees: its image size, crops and flips."""
        made = self.manifest["transform"]
        if made["image_size"] != image_size:
            raise ValueError(f"data.image_size is {image_size} but the cache {self.folder} holds the features of "
                             f"{made['image_size']}-pixel images: set data.image_size: {made['image_size']}")
        crop_scale = [float(x) for x in crop_scale]
        if not self.train_views:
            self._check_eval_view_only(hflip, crop_scale)
            return
        made = made["train"]
        if made["hflip"] != hflip or [float(x) for x in made["crop_scale"]] != crop_scale:
            raise ValueError(f"{self.option}: the cache {self.folder} drew its training views with hflip {made['hflip']}, crop_scale "
                             f"{made['crop_scale']}; this run asks for hflip {hflip}, crop_scale {crop_scale}: make them agree")

    def _check_eval_view_only(self, hflip: bool, crop_scale: list[float]) -> None:
        """Training from the eval view is training on the whole image, unflipped: the run must not claim crops or flips
        (its config.yaml would record augmentations that never happened)."""
        claimed = ([f"data.hflip {hflip}"] if hflip else []) + ([f"data.crop_scale {crop_scale}"] if crop_scale != [1.0, 1.0] else [])
        if claimed:
            raise ValueError(f"{' and '.join(claimed)}: the cache {self.folder} holds the eval view only (made with --views 1), "
                             f"so training from it neither crops nor flips; set data.hflip: false and data.crop_scale: [1.0, 1.0], "
                             f"or cache training views with qformer cache-features --views V (V > 1)")

    def require(self, paths, source: str) -> None:
        """Every image of `source` must be in the cache (a wrong cache is a mistake, not a broken image)."""
        missing = list(dict.fromkeys(p for p in paths if p not in self.index))
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise ValueError(f"{self.option}: {len(missing)} image(s) of {source} are not in the cache {self.folder} ({shown}); "
                             f"cache them with qformer cache-features --data {source}")

    def unreadable(self, path: str) -> UnreadableImage | None:
        reason = self.skipped.get(path)
        return None if reason is None else UnreadableImage(path, f"unreadable when cached: {reason}")

    def tokens(self, path: str, view: int) -> torch.Tensor:
        """(N, width) in the stored dtype (fp16, bf16 or fp32)."""
        part, row = self.index[path]
        tensor = torch.from_numpy(np.array(self._part(part)[row, view]))
        return tensor.view(torch.bfloat16) if self.manifest["dtype"] == "bf16" else tensor

    def _part(self, part: int) -> np.ndarray:
        """A part's memory map, opened once per process; a damaged file is named with the command that redoes it."""
        array = self._arrays.get(part)
        if array is None:
            info = self.manifest["parts"][part]
            file = self.folder / info["file"]
            array, problem = open_part(file, part_shape(self.manifest, info), STORAGE[self.manifest["dtype"]][0])
            if problem:
                command = self.manifest.get("command", "qformer cache-features ...")
                raise ValueError(f"{self.option}: {file}: {problem}; rerun the command that made the cache, which redoes "
                                 f"damaged parts: {command}")
            self._arrays[part] = array
        return array


class FeatureReader:
    """`ImageReader.load` from a cache: the eval view's tokens of a batch of images, the cache's unreadable ones skipped."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        self.root = cache.folder
        self.skipped = SkippedImages()

    def load(self, paths, transform=None) -> tuple[torch.Tensor | None, list[int]]:
        tokens, kept = [], []
        for i, path in enumerate(map(str, paths)):
            error = self.cache.unreadable(path)
            if error is not None:
                self.skipped.add(error)
                continue
            tokens.append(self.cache.tokens(path, EVAL_VIEW))
            kept.append(i)
        return (torch.stack(tokens) if tokens else None), kept


def image_source(images: str | None, features: str | None, encoder, paths, source: str,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, allow_outside_root: bool = False):
    """What an evaluation reads: the images under `images`, or the eval view of a cache checked against `encoder`."""
    if features is not None:
        cache = FeatureCache(features)
        cache.check_encoder(encoder)
        cache.require(list(paths), source)
        return FeatureReader(cache)
    if images is None:
        raise ValueError("--images: give the image folder the annotation paths are relative to (or --features DIR, a feature cache)")
    if not Path(images).is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    return ImageReader(max_image_pixels, Path(images), allow_outside_root)


class CachedCaptionDataset(torch.utils.data.Dataset):
    """`stages.data.captions.CaptionDataset` from a cache: a random training view per sample (`train`), else the eval view."""

    def __init__(self, samples: list[tuple[str, str, int]], cache: FeatureCache, train: bool, strict: bool = False):
        self.samples = samples
        self.cache = cache
        self.views = cache.views if train else [EVAL_VIEW]
        self.strict = strict
        self.seed = 0  # the data module's; a sample's view is drawn from (seed, epoch, index)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        epoch, i = sample_key(key)
        image, text, image_index = self.samples[i]
        error = self.cache.unreadable(image)
        if error is not None:
            if self.strict:
                raise error
            return {"skipped": error.path, "reason": error.reason}
        if epoch is None:
            view, fields = self._view(), sample_text(text, drawn=False)
        else:  # as CaptionDataset: the view from (seed, epoch, index), then an instruction sample's text
            with sample_rng(self.seed, epoch, i):
                view, fields = self._view(), sample_text(text, drawn=True)
        return {"pixel_values": self.cache.tokens(image, view), **fields, "image_id": image_index, "sample_id": i,
                "epoch": epoch or 0}

    def _view(self) -> int:
        return self.views[0] if len(self.views) == 1 else self.views[int(torch.randint(len(self.views), ()))]


# --- part files -------------------------------------------------------------------------------------------
def part_shape(settings: dict, part: dict) -> tuple[int, ...]:
    """(images, views, tokens, width) of one part of a cache's manifest or settings."""
    return (part["images"], settings["views"]["stored"], *settings["token_shape"])


def open_part(file: Path, shape: tuple[int, ...], dtype: str) -> tuple[np.ndarray | None, str | None]:
    """(memory map, None) of a whole part file, or (None, why it cannot be used) for a missing, truncated or foreign one.

    The size is checked against the .npy header first: numpy's own errors for a cut file ("mmap length is greater
    than file size", or a hint about pickles for a damaged header) name neither the file nor the fix.
    """
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            stored_shape, _, stored_dtype = header(f)
            data_offset = f.tell()
        size = file.stat().st_size
    except FileNotFoundError:
        return None, "part file not found"
    except (OSError, ValueError, EOFError) as error:  # no .npy magic or header: empty, cut in the header, or another file
        return None, f"not a whole .npy file (its header cannot be read: {str(error).splitlines()[0]})"
    if tuple(stored_shape) != tuple(shape) or stored_dtype != np.dtype(dtype):
        return None, f"holds {stored_dtype} {tuple(stored_shape)} where the manifest says {dtype} {tuple(shape)}"
    needed = data_offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size < needed:
        return None, f"truncated: {size:,} of its {needed:,} bytes"
    return np.load(file, mmap_mode="r"), None


# --- helpers ---------------------------------------------------------------------------------------------
def read_cache_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): a damaged feature cache; rebuild it with --overwrite") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a feature cache file")
    return data


def _short(value) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)
