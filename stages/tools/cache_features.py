"""`qformer cache-features`: run the frozen image encoder once per image and view and write a feature cache.

The format, and everything that reads a cache, is `stages.data.feature_cache`. A cache is written in place: the settings
first (`cache_settings.json`), then each part into a hidden partial file renamed into place once whole (its list of
unreadable images beside it), and the manifest last, atomically. An interrupted run leaves finished parts, which
the same command keeps and resumes from; a reader refuses the folder until the manifest is there.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.data.feature_cache import (
    EVAL_VIEW,
    FORMAT,
    MANIFEST,
    SETTINGS,
    STORAGE,
    encoder_identity,
    load_encoder,
    open_part,
    part_shape,
    read_cache_file,
)
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, UnreadableImage

PART_BYTES = 512 * 2**20  # resume granularity: at most this much work is redone after an interrupt
DEFAULT_CROP_SCALE = [0.5, 1.0]  # as data.crop_scale


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


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
            old = read_cache_file(out / name)
            old_settings = {k: old.get(k) for k in settings}
            if old_settings == settings:
                return name == MANIFEST and not _unmark_if_damaged(out, settings)
            if not overwrite:
                raise ValueError(f"{out} holds {what} made with other settings ({_first_difference(old_settings, settings)} differs): "
                                 f"give --overwrite to replace it{', or rerun its own command to resume it' if name == SETTINGS else ''}")
            break
    check_out(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return False


def _damaged_parts(out: Path, settings: dict) -> list[str]:
    """'FILE: why' for each part that is missing, truncated or not the array the settings describe."""
    storage = STORAGE[settings["dtype"]][0]
    problems = ((part["file"], open_part(out / part["file"], part_shape(settings, part), storage)[1]) for part in settings["parts"])
    return [f"{file}: {problem}" for file, problem in problems if problem]


def _unmark_if_damaged(out: Path, settings: dict) -> bool:
    """A finished cache with a damaged part becomes an interrupted one again (manifest removed): the run redoes that part."""
    damaged = _damaged_parts(out, settings)
    if damaged:
        print(f"{out}: {len(damaged)} damaged part(s) ({damaged[0]}{' ...' if len(damaged) > 1 else ''}); redoing them",
              file=sys.stderr)
        (out / MANIFEST).unlink()
    return bool(damaged)


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
    crop_scale: list[float] | None = None,
    overwrite: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_outside_root: bool = False,
) -> int:
    """Run the frozen image encoder once per image and view and store its output (before ln_vision) for training and evaluation.

    Rerun after an interrupt (Ctrl-C, kill), the same command resumes; finished parts are kept.

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
        crop_scale: the training views' RandomResizedCrop area range (as data.crop_scale; default 0.5 1.0). With --views 1
            there are no training views: only 1 1 (the whole image, what the eval view is) is accepted.
        overwrite: replace an existing cache (or other folder) made with other settings.
        max_image_pixels: skip images whose header declares more pixels, before decoding.
        allow_outside_root: read annotation paths that lead outside --images (absolute, '..', symbolic links).
    """
    from stages.cli import command_line
    from stages.distributed import device_for

    command = command_line("cache-features", cache_features, dict(locals()))  # first, so it holds just the arguments
    _check_arguments(views, batch_size, dtype, crop_scale, images)
    crop_scale = [float(x) for x in crop_scale or DEFAULT_CROP_SCALE]
    image_list = _images_of(data, allow_outside_root)
    encoder = load_encoder(config, seed, vision_weights)
    identity = encoder_identity(encoder)  # before the first forward (precision auto casts on CUDA)
    torch_device = device_for(device, 0)
    encoder.to(torch_device)
    settings = _settings(encoder, identity, image_list, views, dtype, seed, hflip, crop_scale, torch_device)
    out_dir = Path(out)
    if _prepare_folder(out_dir, settings, overwrite):
        print(f"{out} already holds this feature cache ({len(image_list)} images); nothing to do")
        return 0
    _write_json(out_dir / SETTINGS, {**settings, "command": command})
    reader = ImageReader(max_image_pixels, Path(images), allow_outside_root)
    started = time.perf_counter()
    skipped = _write_parts(out_dir, settings, encoder, reader, hflip, crop_scale, batch_size, torch_device)
    reader.skipped.finish()
    total = sum((out_dir / part["file"]).stat().st_size for part in settings["parts"])
    row_bytes = settings["bytes_per_image"]
    _write_json(out_dir / MANIFEST, {**settings, "skipped": skipped, "total_bytes": total, "command": command})
    train_views, (tokens, width) = settings["views"]["train"], settings["token_shape"]
    print(f"cached {len(image_list) - len(skipped)} images x {1 + train_views} view(s) of {tokens} x {width} "
          f"tokens ({dtype}) in {out} in {time.perf_counter() - started:.1f} s: {row_bytes:,} bytes per image, {total:,} bytes in all"
          + (f"; {len(skipped)} unreadable image(s) recorded as skipped" if skipped else "")
          + ("; the eval view only: a fit from it takes data.hflip false and data.crop_scale [1.0, 1.0]" if not train_views else ""))
    return 0


def _check_arguments(views: int, batch_size: int, dtype: str, crop_scale: list[float] | None, images: str) -> None:
    if views < 1 or batch_size < 1:
        raise ValueError(f"--views and --batch-size must be at least 1, got {views} and {batch_size}")
    if dtype not in STORAGE:
        raise ValueError(f"--dtype must be one of {', '.join(STORAGE)}, got {dtype!r}")
    _check_crop_scale(crop_scale, views)
    if not Path(images).is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")


def _settings(encoder, identity: dict, image_list: list[tuple[str, str]], views: int, dtype: str, seed: int, hflip: bool,
              crop_scale: list[float], device) -> dict:
    """What the cache holds and how it was made: the manifest without the skipped images (also what a resume checks)."""
    size = encoder.config.image_size
    token_shape = list(encoder(torch.zeros(1, 3, size, size, device=device)).shape[1:])
    train_views = views if views > 1 else 0
    row_bytes = (1 + train_views) * token_shape[0] * token_shape[1] * np.dtype(STORAGE[dtype][0]).itemsize
    per_part = max(1, PART_BYTES // row_bytes)
    return {
        **FORMAT,
        "encoder": identity,
        "transform": {"train": _train_transform(hflip, crop_scale) if train_views else None,  # only what was done
                      "eval": {"kind": "Resize(bicubic)"}, "image_size": size, "normalize": "CLIP mean/std"},
        "views": {"eval": EVAL_VIEW, "train": train_views, "stored": 1 + train_views},
        "dtype": dtype,
        "storage_dtype": STORAGE[dtype][0],
        "token_shape": token_shape,
        "seed": seed,
        "bytes_per_image": row_bytes,
        "images": [{"image": image, "image_id": image_id} for image, image_id in image_list],
        "parts": [{"file": f"features-{s:05d}.npy", "start": start, "images": min(per_part, len(image_list) - start)}
                   for s, start in enumerate(range(0, len(image_list), per_part))],
    }


def _write_parts(out_dir: Path, settings: dict, encoder, reader: ImageReader, hflip: bool, crop_scale: list[float],
                 batch_size: int, device) -> dict[str, str]:
    """Every part not already whole (a resumed run keeps the finished ones); returns the unreadable images."""
    from qformer.transforms import eval_transform, train_transform

    size, parts = settings["transform"]["image_size"], settings["parts"]
    transforms = (eval_transform(size), train_transform(size, hflip, tuple(crop_scale)))  # the second unused with one view
    skipped: dict[str, str] = {}
    done_before = 0
    for s, part in enumerate(parts):
        file = out_dir / part["file"]
        whole = open_part(file, part_shape(settings, part), settings["storage_dtype"])[1] is None
        if whole and (out_dir / f"{file.stem}.json").is_file():
            skipped.update(read_cache_file(out_dir / f"{file.stem}.json")["skipped"])
            done_before += 1
            continue
        if s == done_before and done_before:
            print(f"resuming {out_dir}: {done_before} of {len(parts)} part(s) were done", file=sys.stderr)
        paths = [entry["image"] for entry in settings["images"][part["start"] : part["start"] + part["images"]]]
        skipped.update(_write_part(file, paths, encoder, reader, transforms, settings, (settings["seed"] << 20) + s, batch_size, device))
        print(f"part {s + 1}/{len(parts)}: {part['images']} images", file=sys.stderr)
    return skipped


def _check_crop_scale(crop_scale: list[float] | None, views: int) -> None:
    if crop_scale is None:
        return
    crop_scale = [float(x) for x in crop_scale]
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"--crop-scale takes two area fractions 0 < low <= high <= 1, got {crop_scale}")
    if views == 1 and crop_scale != [1.0, 1.0]:  # the eval view is the whole image: nothing would be cropped
        raise ValueError(f"--crop-scale {crop_scale[0]:g} {crop_scale[1]:g} applies to training views, and --views 1 stores the "
                         f"eval view only (the whole image): give --views V (V > 1) to cache V cropped views, or leave --crop-scale out")


def _train_transform(hflip: bool, crop_scale: list[float]) -> dict:
    kind = "RandomResizedCrop(bicubic) + RandomHorizontalFlip" if hflip else "RandomResizedCrop(bicubic)"
    return {"kind": kind, "crop_scale": crop_scale, "hflip": hflip}


def _images_of(files: list[str], allow_outside_root: bool) -> list[tuple[str, str]]:
    """(normalised path, image id) of every distinct image of the annotation (or VQA question) files, in order."""
    from stages.data.annotations import AnnotationError, load_annotations, read_json

    images: dict[str, str] = {}
    for file in files:
        content = read_json(file)
        if isinstance(content, list) and content and isinstance(content[0], dict) and "question" in content[0]:
            from stages.eval.vqa import load_questions

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
def _write_part(file: Path, paths: list[str], encoder, reader: ImageReader, transforms, settings: dict, seed: int,
                 batch_size: int, device: torch.device) -> dict[str, str]:
    """One part, written into a hidden partial file and renamed into place once whole (its skipped list first)."""
    storage, torch_dtype = STORAGE[settings["dtype"]]
    stored = settings["views"]["stored"]
    eval_view, train_view = transforms
    partial = file.with_name(f".{file.name}.partial")
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=storage, shape=(len(paths), stored, *settings["token_shape"]))
    skipped: dict[str, str] = {}
    torch.manual_seed(seed)  # the views of a part do not depend on whether the run was resumed
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
    except BaseException:  # an interrupt too: the partial part is redone on resume
        partial.unlink(missing_ok=True)
        raise
    return skipped
