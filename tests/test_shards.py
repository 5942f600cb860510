"""Webdataset shards in img2dataset's layout: `make-shards` writes them, training reads them as open_clip does
(disjoint shares per process, a fixed epoch, broken samples skipped and counted), and a run resumes on them."""

import csv
import io
import json
import signal
import sys
import tarfile
from pathlib import Path

import processes
import pytest
import torch
from PIL import Image

from stages.cli import main
from stages.data.captions import Collate
from stages.data.synthetic import make_dataset
from stages.data.text import BertText
from stages.data.webdataset import ShardStream, expand_shards
from stages.train.optim import warmup_cosine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shard_data")
    make_dataset(folder, num_images=20, seed=5)
    return folder


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "train"
    assert main(["make-shards", str(data / "train.json"), "--images", str(data), "--out", str(out), "--samples-per-shard", "20"]) == 0
    assert main(["make-shards", str(data / "val.json"), "--images", str(data), "--out", str(out.parent / "val")]) == 0
    return out


def pairs(annotations: Path) -> int:
    return sum(1 for entry in json.loads(annotations.read_text()) for _ in ([entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]))


def test_make_shards_writes_img2dataset_layout_and_leaves_out_broken_images(data, tmp_path, capsys):
    entries = json.loads((data / "val.json").read_text())
    (data / "images" / "broken.png").write_bytes(b"not an image at all")
    entries.append({"image": "images/broken.png", "caption": "a broken picture", "image_id": 999})
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    assert main(["make-shards", str(tmp_path / "ann.json"), "--images", str(data), "--out", str(tmp_path / "s"),
                 "--samples-per-shard", "4"]) == 0
    assert "images/broken.png" in capsys.readouterr().err
    tars = sorted((tmp_path / "s").glob("*.tar"))
    stats = [json.loads(t.with_name(t.stem + "_stats.json").read_text()) for t in tars]
    assert sum(s["count"] for s in stats) == pairs(tmp_path / "ann.json")  # one sample per (image, caption) pair
    assert sum(s["successes"] for s in stats) == pairs(tmp_path / "ann.json") - 1
    assert sum(s["failed_to_download"] for s in stats) == 1
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert {Path(n).suffix for n in names} == {".png", ".txt", ".json"} and {"caption", "image", "image_id"} <= set(meta)
    spec = f"{tmp_path / 's'}/{{00000..{len(tars) - 1:05d}}}.tar"
    assert expand_shards(spec, "data.train") == [str(t) for t in tars]
    assert len(expand_shards(f"{spec}::{tars[0]}", "data.train")) == len(tars) + 1  # specs joined with ::
    with pytest.raises(FileNotFoundError, match="data.train: 1 of the 2 shard"):
        expand_shards(f"{tmp_path / 's'}/{{00000,00099}}.tar", "data.train")


def test_make_shards_with_no_readable_image_fails_in_one_line_and_writes_nothing(data, tmp_path, capsys):
    entries = json.loads((data / "val.json").read_text())
    (tmp_path / "ann.json").write_text(json.dumps(entries))  # paths relative to data, given the wrong --images
    capsys.readouterr()
    assert main(["make-shards", str(tmp_path / "ann.json"), "--images", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    captured = capsys.readouterr()
    images = len({e["image"] for e in entries})
    assert captured.out == "" and len(captured.err.splitlines()) == 1  # no screen of "skipping ..." notes
    assert captured.err.startswith(f"qformer make-shards: error: 0 of {images} images could be read; first errors: ")
    assert "file not found" in captured.err and f"--images {tmp_path}" in captured.err
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.partial-*"))


def empty_shard(path: Path, stats: dict | None) -> str:
    """A tar without a member, as make-shards wrote when no image could be read (with its _stats.json, or none)."""
    tarfile.open(path, "w").close()
    if stats is not None:
        path.with_name(f"{path.stem}_stats.json").write_text(json.dumps(stats))
    return str(path)


@pytest.mark.parametrize("train_samples, stats", [(None, {"count": 8, "successes": 0, "failed_to_download": 8}),
                                                   (40, {"count": 8, "successes": 0, "failed_to_download": 8}), (40, None)])
def test_fit_on_an_empty_shard_set_says_the_shards_are_empty(tmp_path, train_samples, stats):
    from stages.data.captions import CaptionDataModule

    spec = empty_shard(tmp_path / "00000.tar", stats)
    module = CaptionDataModule(spec, batch_size=4, train_samples=train_samples)
    # Before: "0 image-caption pairs, fewer than one batch; lower data.batch_size", or with data.train_samples a fit
    # that waited forever for a first sample.
    with pytest.raises(ValueError, match=rf"^data.train: the shards of {spec} are empty: no sample in 1 shard\(s\)"
                                         "; remake them with qformer make-shards"):
        module.setup("fit")


def test_an_empty_shard_among_others_is_left_out(shards, tmp_path):
    from stages.data.captions import CaptionDataModule

    good = sorted(str(p) for p in shards.glob("*.tar"))
    empty = empty_shard(tmp_path / "00000.tar", None)
    module = CaptionDataModule("::".join([*good, empty]), batch_size=4, train_samples=8)
    module.setup("fit")
    assert module.train_set.urls == good  # a worker given only the empty shard would wait forever


def png(color=(200, 30, 30), size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_gaps_missing_parts_corrupt_members_and_a_damaged_tar_are_skipped_and_named(data, tmp_path):
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    good = tmp_path / "00000.tar"
    with tarfile.open(good, "w") as tar:
        add(tar, "000000000.png", png())
        add(tar, "000000000.txt", b"a red square")
        add(tar, "000000003.png", png((0, 0, 255)))  # keys 1 and 2 are gaps: failed downloads
        add(tar, "000000003.json", json.dumps({"caption": "a blue square"}).encode())
        add(tar, "000000004.txt", b"a caption without its image")
        add(tar, "000000005.png", png())  # an image without a caption
        add(tar, "000000006.jpg", b"this text is named like a jpeg")
        add(tar, "000000006.txt", b"a broken image")
        add(tar, "000000007.png", bomb.getvalue())
        add(tar, "000000007.txt", b"a decompression bomb")
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        for n in range(6):
            add(tar, f"00001{n:04d}.png", png((n * 40, 0, 0)))
            add(tar, f"00001{n:04d}.txt", f"sample {n}".encode())
    damaged = tmp_path / "00001.tar"
    damaged.write_bytes(whole.read_bytes()[: 4 * 1024 + 700])  # cut inside the third sample's image

    from qformer.bert import load_tokenizer
    from qformer.transforms import eval_transform

    stream = ShardStream([str(good), str(damaged)], eval_transform(8), Collate(BertText(load_tokenizer(data), 16)), batch_size=4,
                         rank=0, world=1, num_workers=0, seed=0, train=False, max_image_pixels=1_000_000)
    batches = list(stream)
    skipped = [s for b in batches for s in b["skipped"]]
    captions = [c for b in batches for c in b.get("captions", [])]  # a batch of only skipped samples has none
    assert {"a red square", "a blue square", "sample 0", "sample 1"} <= set(captions)
    reasons = "\n".join(skipped)
    assert f"{good}:000000004 (no image in the sample" in reasons
    assert f"{good}:000000005 (no caption in the sample" in reasons
    assert f"{good}:000000006.jpg (cannot identify image file)" in reasons
    assert f"{good}:000000007.png (900,000,000 pixels is over the limit of 1,000,000" in reasons
    assert f"{damaged} (damaged tar, the rest of the shard skipped" in reasons
    assert f"{damaged}:000010002 (no caption" in reasons  # the sample the cut went through: its image, not its caption
    assert len(skipped) == 6


def test_two_processes_read_disjoint_shares_of_a_fixed_epoch_and_stage1_learns(data, shards, tmp_path):
    record = tmp_path / "seen"
    callbacks = [{"class_path": "resume_helpers.RecordSamples", "init_args": {"path": str(record), "per_rank": True}}]
    epoch_samples, batch = 64, 8
    command = [
        "-m", "stages.cli", "stage1", "fit", "--config", str(ROOT / "configs" / "stage1" / "tiny.yaml"),
        "--model.tokenizer", str(data), "--data.train", str(shards / "{00000..00003}.tar"),
        "--data.val", str(shards.parent / "val" / "00000.tar"), "--data.image_root", "null",
        "--data.train_samples", str(epoch_samples), "--data.batch_size", str(batch), "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--trainer.max_steps", "24", "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.callbacks", json.dumps(callbacks),
    ]
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    # launched as torchrun launches it (docs/scaling.md's way to read shards on several nodes); tests/test_ddp.py
    # covers Lightning starting the second process itself
    results = processes.torchrun(command, nprocs=2, env=env, cwd=ROOT, timeout=400)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:] + results[1].stderr[-3000:]
    seen = [[line.split(" ", 1) for line in Path(f"{record}.rank{r}").read_text().splitlines()] for r in (0, 1)]
    per_epoch = epoch_samples // (batch * 2)
    assert [int(step) for step, _ in seen[0]] == list(range(24)) == [int(step) for step, _ in seen[1]]
    for epoch in range(24 // per_epoch):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        ranks = [[i for s in steps for i in json.loads(seen[r][s][1])] for r in (0, 1)]
        assert not set(ranks[0]) & set(ranks[1])  # each process reads its own shards
        assert len(ranks[0]) + len(ranks[1]) == epoch_samples
    with open(next((tmp_path / "runs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert [r for r in rows if r.get("val/r_mean")]  # validation read its shards too


def test_stage2_from_shards_stops_on_sigterm_and_resumes_with_its_schedule(data, shards, tmp_path):
    from qformer.bert import load_tokenizer
    from qformer.config import preset
    from qformer.folders import save_stage1
    from qformer.stage1 import Stage1Model

    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    stage1 = save_stage1(Stage1Model(config), tokenizer, tmp_path / "stage1")
    root = tmp_path / "runs"
    argv = [
        "stage2", "fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--model.stage1", str(stage1),
        "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder"), "--model.warmup_steps", "5",
        "--data.train", str(shards / "{00000..00003}.tar"), "--data.image_root", "null", "--data.val", "null",
        "--data.resampled", "true", "--trainer.default_root_dir", str(root), "--trainer.max_steps", "40",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    ]
    sys.path.insert(0, str(ROOT / "tests"))
    stop = {"class_path": "resume_helpers.SignalAt", "init_args": {"step": 14, "signal_name": "SIGTERM"}}
    assert main(argv + ["--trainer.callbacks", json.dumps([stop])]) == 128 + signal.SIGTERM
    assert main(argv + ["--ckpt_path", "last"]) == 0

    rows = []
    for metrics in sorted(root.rglob("metrics.csv")):  # the first run's folder, then the resumed one's
        with open(metrics) as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/loss_lm")]
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(40))  # the resumed run continued at step 15, not at 0
    for row in rows:  # the schedule continues where it was (the scheduler's state restored, the same run length)
        assert float(row["train/lr"]) == pytest.approx(1e-3 * warmup_cosine(int(row["step"]), 5, 40, 0.1), rel=1e-5)
    losses = [float(r["train/loss_lm"]) for r in rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


def test_eval_retrieval_reads_shards_as_it_reads_the_folder(data, tmp_path):
    from qformer.bert import load_tokenizer
    from qformer.config import preset
    from qformer.folders import save_stage1
    from qformer.stage1 import Stage1Model

    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    stage1 = save_stage1(Stage1Model(config), tokenizer, tmp_path / "stage1")
    shards = tmp_path / "test_shards"
    assert main(["make-shards", str(data / "test.json"), "--images", str(data), "--out", str(shards), "--samples-per-shard", "3"]) == 0
    spec = f"{shards}/{{00000..{len(list(shards.glob('*.tar'))) - 1:05d}}}.tar"
    scores = {}
    for name, source in (("folder", ["--data", str(data / "test.json"), "--images", str(data)]), ("shards", ["--data", spec])):
        assert main(["eval", "retrieval", "--model", str(stage1), *source, "--k-test", "4", "--json", str(tmp_path / f"{name}.json"),
                     "--no-progress"]) == 0
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["shards"]["images"] == scores["folder"]["images"] and scores["shards"]["texts"] == scores["folder"]["texts"]
    for metric in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert scores["shards"][metric] == pytest.approx(scores["folder"][metric]), metric
