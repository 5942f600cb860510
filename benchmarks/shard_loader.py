"""Training data throughput: webdataset shards vs an annotation file + image folder, on the same JPEG images.

    python benchmarks/shard_loader.py                      # 768 images of 256 px, batch 32, 2 workers, 224 px crops
    python benchmarks/shard_loader.py --images 2000 --workers 4

Both loaders run the project's training pipeline (`CaptionDataModule.train_dataloader`: decode, random resized crop,
flip, tokenize, collate) and are timed over the same number of batches after a warm-up; the table gives samples/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from PIL import Image

from benchmarks.common import print_table


def jpeg_dataset(folder: Path, images: int) -> Path:
    """The synthetic scenes at 256 px, re-saved as JPEG (what img2dataset stores), with their annotation file."""
    from stages.data.synthetic import make_dataset

    make_dataset(folder, num_images=images, seed=0, image_size=256, val_images=1, test_images=1)
    entries = json.loads((folder / "train.json").read_text())
    for entry in entries:
        png = folder / entry["image"]
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=90)
        entry["image"] = str(Path(entry["image"]).with_suffix(".jpg"))
    (folder / "train_jpg.json").write_text(json.dumps(entries))
    return folder / "train_jpg.json"


def samples_per_second(train: str, image_root: str | None, tokenizer: str, batch: int, workers: int, batches: int,
                       warmup: int) -> float:
    from stages.data.captions import CaptionDataModule

    data = CaptionDataModule(train, image_root=image_root, tokenizer_dir=tokenizer, batch_size=batch, num_workers=workers,
                             image_size=224, seed=0, shuffle_buffer=256)
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    from stages.tools.make_shards import make_shards

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        annotations = jpeg_dataset(folder, args.images)
        pairs = sum(len(e["caption"]) if isinstance(e["caption"], list) else 1 for e in json.loads(annotations.read_text()))
        shards = Path(tmp) / "shards"
        make_shards([str(annotations)], images=str(folder), out=str(shards), samples_per_shard=500)
        spec = f"{shards}/{{00000..{len(list(shards.glob('*.tar'))) - 1:05d}}}.tar"
        timing = dict(tokenizer=str(folder), batch=args.batch, workers=args.workers, batches=args.batches, warmup=args.warmup)
        folder_rate = samples_per_second(str(annotations), str(folder), **timing)
        shard_rate = samples_per_second(spec, None, **timing)
    print(f"\n{args.images - 2} JPEG images (256 px, {pairs} image-caption pairs), batch {args.batch}, {args.workers} workers, "
          f"224 px random crops; {args.batches} batches timed after {args.warmup}")
    print_table(["loader", "samples/s", "vs folder"],
                [["annotation file + image folder", folder_rate, "1.00x"],
                 ["webdataset shards", shard_rate, f"{shard_rate / folder_rate:.2f}x"]])


if __name__ == "__main__":
    main()
