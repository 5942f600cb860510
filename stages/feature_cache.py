"""The frozen-feature cache: the image encoder runs once per image and view, training and evaluation read its output.

`qformer cache-features` stores the frozen encoder's patch tokens, taken *before* `ln_vision` (which trains), for
every image of one or more annotation files:

* views: view 0 is the eval view (`eval_transform`); with `--views V` and V > 1, views 1..V are V training views drawn
  with `train_transform` (random resized crop + flip, with the settings recorded). `--views 1` stores the eval view
  only, and training then uses it.
* storage: numpy `.npy` files, read with `np.load(mmap_mode="r")`. Each shard `features-NNNNN.npy` is
  (images, views, tokens, width); bf16 is stored as uint16 and read back with `.view(torch.bfloat16)` (numpy has no
  bf16). `.npy` rather than safetensors because a shard is written row by row into a memory-mapped file
  (`open_memmap`): nothing is held in memory, an interrupted run loses at most one shard, and any row is read
  lazily (one DataLoader worker opens its own maps) with no dependency beyond numpy.
* `feature_cache.json`, the manifest, is written last and atomically. It records the encoder (timm name, sha256 of
  its pruned weights, image size, drop_last_blocks, width), the transforms, views, dtype, token shape, and every
  image (normalised relative path + image id) with those that could not be read. A folder without it is an
  interrupted cache: readers refuse it and the same command resumes it (finished shards are kept).

A model whose encoder differs from the cache's is refused, naming the field; an image the cache could not read is
named once when caching and its samples are skipped and counted (as unreadable images are) when training from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, SkippedImages, UnreadableImage

MANIFEST = "feature_cache.json"  # written last: a folder without it is not (yet) a cache
SETTINGS = "cache_settings.json"  # written first: what an interrupted run was making, to resume it
FORMAT = {"format": "qformer-feature-cache", "version": 1}
STORAGE = {"fp16": ("float16", torch.float16), "bf16": ("uint16", torch.bfloat16), "fp32": ("float32", torch.float32)}
SHARD_BYTES = 512 * 2**20  # resume granularity: at most this much work is redone after an interrupt
ENCODER_FIELDS = ("model_name", "image_size", "drop_last_blocks", "width", "weights_sha256")  # checked in this order
EVAL_VIEW = 0


# --- the encoder's identity -------------------------------------------------------------------------------
def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict (sorted keys; each name, dtype, shape and bytes), as loaded.

    Call it before the encoder first runs: precision "auto" casts the weights to fp16 on the first CUDA forward.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


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
    from qformer.export import read_config, read_export_info
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
    """A finished cache folder: its manifest, and its shards opened lazily (per process, so per DataLoader worker)."""

    def __init__(self, folder: str | Path, option: str = "--features"):
        self.folder = Path(folder)
        self.option = option
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{option}: feature cache folder not found: {self.folder}")
        if not (self.folder / MANIFEST).is_file():
            if (self.folder / SETTINGS).is_file():
                command = _read_json(self.folder / SETTINGS).get("command", "qformer cache-features ...")
                raise ValueError(f"{option}: {self.folder} is an incomplete feature cache (caching was interrupted); "
                                 f"rerun the command that made it to resume: {command}")
            raise ValueError(f"{option}: {self.folder} is not a feature cache (no {MANIFEST}); make one with qformer cache-features")
        self.manifest = _read_json(self.folder / MANIFEST)
        if {k: self.manifest.get(k) for k in FORMAT} != FORMAT:
            raise ValueError(f"{option}: {self.folder / MANIFEST}: not a feature cache manifest of version {FORMAT['version']}")
        self.index: dict[str, tuple[int, int]] = {}  # image path -> (shard, row)
        for shard, info in enumerate(self.manifest["shards"]):
            for row in range(info["images"]):
                self.index[self.manifest["images"][info["start"] + row]["image"]] = (shard, row)
        self.skipped: dict[str, str] = self.manifest["skipped"]
        self.train_views = self.manifest["views"]["train"]
        self._arrays: dict[int, np.ndarray] = {}

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

    def check_transform(self, hflip: bool, crop_scale) -> None:
        """Training views must have been drawn as the data module would draw them."""
        if not self.train_views:
            return
        made = self.manifest["transform"]["train"]
        if made["hflip"] != hflip or [float(x) for x in made["crop_scale"]] != [float(x) for x in crop_scale]:
            raise ValueError(f"{self.option}: the cache {self.folder} drew its training views with hflip {made['hflip']}, crop_scale "
                             f"{made['crop_scale']}; this run asks for hflip {hflip}, crop_scale {list(crop_scale)}: make them agree")

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
        shard, row = self.index[path]
        array = self._arrays.get(shard)
        if array is None:
            array = self._arrays[shard] = np.load(self.folder / self.manifest["shards"][shard]["file"], mmap_mode="r")
        tensor = torch.from_numpy(np.array(array[row, view]))
        return tensor.view(torch.bfloat16) if self.manifest["dtype"] == "bf16" else tensor


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
    """`stages.data.CaptionDataset` from a cache: a random training view per sample (`train`), else the eval view."""

    def __init__(self, samples: list[tuple[str, str, int]], cache: FeatureCache, train: bool, strict: bool = False):
        self.samples = samples
        self.cache = cache
        self.views = cache.views if train else [EVAL_VIEW]
        self.strict = strict

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        image, caption, image_index = self.samples[i]
        error = self.cache.unreadable(image)
        if error is not None:
            if self.strict:
                raise error
            return {"skipped": error.path, "reason": error.reason}
        view = self.views[int(torch.randint(len(self.views), ()))] if len(self.views) > 1 else self.views[0]
        return {"pixel_values": self.cache.tokens(image, view), "caption": caption, "image_id": image_index, "sample_id": i}


# --- writing ------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): a damaged feature cache; rebuild it with --overwrite") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a feature cache file")
    return data


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _short(value) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)


def _first_difference(old: dict, new: dict) -> str:
    for key in new:
        if old.get(key) != new[key]:
            if isinstance(new[key], dict) and isinstance(old.get(key), dict):
                inner = _first_difference(old[key], new[key])
                return f"{key}.{inner}" if inner else key
            return key
    return next((k for k in old if k not in new), "")


def _prepare_folder(out: Path, settings: dict, overwrite: bool) -> bool:
    """Make `out` ready; True when it already holds this exact cache (nothing to do)."""
    from qformer.files import check_out

    for name, what in ((MANIFEST, "a feature cache"), (SETTINGS, "an interrupted feature cache")):
        if (out / name).is_file():
            old = _read_json(out / name)
            old_settings = {k: old.get(k) for k in settings}
            if old_settings == settings:
                return name == MANIFEST
            if not overwrite:
                raise ValueError(f"{out} holds {what} made with other settings ({_first_difference(old_settings, settings)} differs): "
                                 f"give --overwrite to replace it{', or rerun its own command to resume it' if name == SETTINGS else ''}")
            break
    check_out(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return False


def _command_line(config, vision_weights, data, images, out, views, dtype, batch_size, seed, device, hflip, crop_scale,
                  max_image_pixels, allow_outside_root) -> str:
    words = ["qformer", "cache-features", "--config", config]
    words += [] if vision_weights is None else ["--vision-weights", vision_weights]
    words += ["--data", *data, "--images", images, "--out", out,
             "--views", views, "--dtype", dtype, "--batch-size", batch_size, "--seed", seed, "--device", device,
             "--crop-scale", *crop_scale]
    words += [] if hflip else ["--no-hflip"]
    words += [] if max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS else ["--max-image-pixels", max_image_pixels]
    words += ["--allow-outside-root"] if allow_outside_root else []
    return shlex.join(map(str, words))


def cache_features(
    *,
    config: str,
    vision_weights: str | None = None,
    data: list[str],
    images: str,
    out: str,
    views: int = 1,
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16",
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    hflip: bool = True,
    crop_scale: list[float] = (0.5, 1.0),
    overwrite: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_outside_root: bool = False,
) -> int:
    """Run the frozen image encoder once per image and view and store its output (before ln_vision) for training and evaluation.

    Rerun after an interrupt (Ctrl-C, kill), the same command resumes; finished shards are kept.

    Args:
        config: the model whose encoder to run: a preset (vitg, vitl, tiny), a model config file, or an export folder.
        vision_weights: the encoder's weights file, replacing the config's vision_config.weights_path (as --model.vision_weights).
        data: one or more annotation files (LAVIS / COCO-Karpathy lists, official COCO captions or VQA question files).
        images: image root folder the annotation paths are relative to.
        out: the cache folder to write.
        views: 1: the eval view only (training then uses it); V > 1: the eval view plus V training views (random resized
            crop + flip, as training draws them), of which training takes one at random per sample.
        dtype: storage precision: fp16 (what the paper's ViT-g computes in), bf16 or fp32.
        batch_size: images (times views) per encoder batch.
        seed: the seed a randomly initialised encoder is built with (as --seed_everything in stage1 fit), and of the views.
        device: cpu, cuda or cuda:N.
        hflip: training views may be flipped horizontally (as data.hflip).
        crop_scale: the training views' RandomResizedCrop area range (as data.crop_scale).
        overwrite: replace an existing cache (or other folder) made with other settings.
        max_image_pixels: skip images whose header declares more pixels, before decoding.
        allow_outside_root: read annotation paths that lead outside --images (absolute, '..', symbolic links).
    """
    from stages.data import eval_transform, train_transform
    from stages.distributed import device_for

    if views < 1 or batch_size < 1:
        raise ValueError(f"--views and --batch-size must be at least 1, got {views} and {batch_size}")
    if dtype not in STORAGE:
        raise ValueError(f"--dtype must be one of {', '.join(STORAGE)}, got {dtype!r}")
    crop_scale = [float(x) for x in crop_scale]
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"--crop-scale takes two area fractions 0 < low <= high <= 1, got {crop_scale}")
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    command = _command_line(config, vision_weights, data, images, out, views, dtype, batch_size, seed, device, hflip, crop_scale,
                            max_image_pixels, allow_outside_root)
    image_list = _images_of(data, allow_outside_root)
    encoder = load_encoder(config, seed, vision_weights)
    identity = encoder_identity(encoder)  # before the first forward (precision auto casts on CUDA)
    torch_device = device_for(device, 0)
    encoder.to(torch_device)
    size = encoder.config.image_size
    token_shape = list(encoder(torch.zeros(1, 3, size, size, device=torch_device)).shape[1:])
    train_views = views if views > 1 else 0
    row_bytes = (1 + train_views) * token_shape[0] * token_shape[1] * np.dtype(STORAGE[dtype][0]).itemsize
    per_shard = max(1, SHARD_BYTES // row_bytes)
    settings = {
        **FORMAT,
        "encoder": identity,
        "transform": {"train": {"kind": "RandomResizedCrop(bicubic) + RandomHorizontalFlip" if hflip else "RandomResizedCrop(bicubic)",
                                "crop_scale": crop_scale, "hflip": hflip},
                      "eval": {"kind": "Resize(bicubic)"}, "image_size": size, "normalize": "CLIP mean/std"},
        "views": {"eval": EVAL_VIEW, "train": train_views, "stored": 1 + train_views},
        "dtype": dtype,
        "storage_dtype": STORAGE[dtype][0],
        "token_shape": token_shape,
        "seed": seed,
        "images": [{"image": image, "image_id": image_id} for image, image_id in image_list],
        "shards": [{"file": f"features-{s:05d}.npy", "start": start, "images": min(per_shard, len(image_list) - start)}
                   for s, start in enumerate(range(0, len(image_list), per_shard))],
    }
    out_dir = Path(out)
    if _prepare_folder(out_dir, settings, overwrite):
        print(f"{out} already holds this feature cache ({len(image_list)} images); nothing to do")
        return 0
    _write_json(out_dir / SETTINGS, {**settings, "command": command})
    reader = ImageReader(max_image_pixels, root, allow_outside_root)
    transforms = (eval_transform(size), train_transform(size, hflip, tuple(crop_scale)))
    skipped: dict[str, str] = {}
    started, done_before = time.perf_counter(), 0
    for s, shard in enumerate(settings["shards"]):
        file = out_dir / shard["file"]
        if file.is_file() and (out_dir / f"{file.stem}.json").is_file():
            skipped.update(_read_json(out_dir / f"{file.stem}.json")["skipped"])
            done_before += 1
            continue
        if s == done_before and done_before:
            print(f"resuming {out}: {done_before} of {len(settings['shards'])} shard(s) were done", file=sys.stderr)
        paths = [entry["image"] for entry in settings["images"][shard["start"] : shard["start"] + shard["images"]]]
        skipped.update(_write_shard(file, paths, encoder, reader, transforms, settings, (seed << 20) + s, batch_size, torch_device))
        print(f"shard {s + 1}/{len(settings['shards'])}: {shard['images']} images", file=sys.stderr)
    reader.skipped.finish()
    total = sum((out_dir / shard["file"]).stat().st_size for shard in settings["shards"])
    _write_json(out_dir / MANIFEST, {**settings, "skipped": skipped, "bytes_per_image": row_bytes, "total_bytes": total,
                                     "command": command})
    print(f"cached {len(image_list) - len(skipped)} images x {1 + train_views} view(s) of {token_shape[0]} x {token_shape[1]} "
          f"tokens ({dtype}) in {out} in {time.perf_counter() - started:.1f} s: {row_bytes:,} bytes per image, {total:,} bytes in all"
          + (f"; {len(skipped)} unreadable image(s) recorded as skipped" if skipped else ""))
    return 0


def _images_of(files: list[str], allow_outside_root: bool) -> list[tuple[str, str]]:
    """(normalised path, image id) of every distinct image of the annotation (or VQA question) files, in order."""
    from stages.annotations import AnnotationError, load_annotations, read_json

    images: dict[str, str] = {}
    for file in files:
        content = read_json(file)
        if isinstance(content, list) and content and isinstance(content[0], dict) and "question" in content[0]:
            from stages.vqa import load_questions

            for question in load_questions(file, allow_outside_root):
                images.setdefault(question.image, question.image)
            continue
        try:
            entries = load_annotations(file, allow_outside_root)
        except AnnotationError as error:
            raise ValueError(f"--data: {error}") from None
        for entry in entries:
            images.setdefault(entry.image, entry.image_id)
    return list(images.items())


@torch.no_grad()
def _write_shard(file: Path, paths: list[str], encoder, reader: ImageReader, transforms, settings: dict, seed: int,
                 batch_size: int, device: torch.device) -> dict[str, str]:
    """One shard, written into a hidden partial file and renamed into place once whole (its skipped list first)."""
    storage, torch_dtype = STORAGE[settings["dtype"]]
    stored = settings["views"]["stored"]
    eval_view, train_view = transforms
    partial = file.with_name(f".{file.name}.partial")
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=storage, shape=(len(paths), stored, *settings["token_shape"]))
    skipped: dict[str, str] = {}
    torch.manual_seed(seed)  # the views of a shard do not depend on whether the run was resumed
    try:
        for start in range(0, len(paths), max(1, batch_size // stored)):
            pixels, rows = [], []
            for row in range(start, min(start + max(1, batch_size // stored), len(paths))):
                try:
                    image = reader.open(paths[row])
                except UnreadableImage as error:
                    reader.skipped.add(error)  # named once, now
                    skipped[paths[row]] = error.reason
                    continue
                pixels += [eval_view(image)] + [train_view(image) for _ in range(stored - 1)]
                rows.append(row)
            if not rows:
                continue
            tokens = torch.cat([encoder(batch.to(device)) for batch in torch.stack(pixels).split(batch_size)])
            tokens = tokens.to(torch_dtype)
            if not torch.isfinite(tokens).all():
                raise ValueError(f"the encoder's output does not fit in --dtype {settings['dtype']} (inf or NaN) for an image among "
                                 f"{paths[rows[0]]} ...; use --dtype bf16 or fp32")
            tokens = tokens.view(len(rows), stored, *tokens.shape[1:]).cpu()
            if storage == "uint16":
                tokens = tokens.view(torch.int16)  # the bits of bf16; numpy reads them as uint16
            array[rows] = tokens.numpy().view(storage)
        array.flush()
        del array
        _write_json(file.with_name(f"{file.stem}.json"), {"skipped": skipped})
        os.replace(partial, file)
    except BaseException:  # an interrupt too: the partial shard is redone on resume
        partial.unlink(missing_ok=True)
        raise
    return skipped
