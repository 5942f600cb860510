"""Task mixtures (issue 29): `data.train` as several files with weights or p ~ sqrt(size), the effective ratios reported,
an order that a killed run resumed with `--ckpt_path last` replays exactly, and shard specs mixed the same way."""

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from stages.cli import main
from stages.data.captions import CaptionDataModule
from stages.data.instructions import read_samples
from stages.data.mixture import MixturePart, MixtureSampler, mixture_order, mixture_probabilities, parse_mixture
from stages.data.synthetic import make_dataset
from stages.train.resume import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "stage1" / "tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixture_data")
    make_dataset(folder, num_images=12, seed=4, val_images=2, test_images=2, image_size=32)
    return folder


def test_without_weights_files_are_drawn_with_p_proportional_to_sqrt_size():
    parts = [MixturePart("a.json", None), MixturePart("b.json", None)]
    assert mixture_probabilities(parts, [100, 25]) == pytest.approx([10 / 15, 5 / 15])
    weighted = [MixturePart("a.json", 1.0), MixturePart("b.json", 3.0)]
    assert mixture_probabilities(weighted, [100, 25]) == pytest.approx([0.25, 0.75])


def test_the_order_follows_the_probabilities_and_cycles_each_file_before_repeating():
    sizes, probabilities = [40, 10], [0.5, 0.5]
    order = mixture_order(sizes, probabilities, 4000, torch.Generator().manual_seed(0))
    small = [i - 40 for i in order if i >= 40]
    assert abs(len(small) / len(order) - 0.5) < 0.03  # the small file is drawn half the time, 50x its size
    assert all(sorted(small[k:k + 10]) == list(range(10)) for k in range(0, len(small) - 10, 10))  # a shuffled cycle
    assert order == mixture_order(sizes, probabilities, 4000, torch.Generator().manual_seed(0))


def test_the_sampler_splits_an_epoch_among_processes_and_starts_part_way_when_resumed():
    dataset = list(range(30))
    ranks = [MixtureSampler(dataset, 4, 2, rank, seed=7, sizes=[20, 10], probabilities=[0.3, 0.7]) for rank in (0, 1)]
    epoch = [list(sampler) for sampler in ranks]
    assert len(epoch[0]) == len(epoch[1]) == 15 and all(e == 0 for e, _ in epoch[0])
    whole = ranks[0]
    whole.set_epoch(1)
    later = list(whole)
    assert later != epoch[0]
    whole.resume_at = (1, 2)  # two batches of epoch 1 were trained
    assert list(whole) == later[8:]


@pytest.mark.parametrize(("train", "message"), [
    (["a.json", {"path": "b.json", "weight": 0}], "data.train[1] (b.json): weight must be a positive number, got 0"),
    ([{"path": "a.json", "weight": "two"}], "data.train[0] (a.json): weight must be a positive number, got 'two'"),
    ([{"path": "a.json", "weight": True}], "weight must be a positive number, got True"),
    ([{"path": "a.json", "weight": float("nan")}], "weight must be a positive number, got nan"),
    ([{"path": "a.json", "weight": 1}, "b.json"], "data.train[1] (b.json): no weight while others have one"),
    ([{"path": "a.json", "wieght": 1}], "data.train[0] (a.json): unknown key(s) wieght"),
    ([{"weight": 1}], "data.train[0]: expected a file name or {path: FILE, weight: NUMBER}"),
    ([], "data.train: give a file, a shard spec or a list of them"),
    (["a.json", "missing.json"], "data.train[1]: annotation file not found: "),
    (["a.json", "x/{00000..00001}.tar"], "a mixture is all annotation files or all shard specs"),
])
def test_bad_mixture_entries_are_named(tmp_path, monkeypatch, train, message):
    monkeypatch.chdir(tmp_path)
    Path("a.json").write_text("[]")
    Path("b.json").write_text("[]")
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        parse_mixture(train)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_data_module_mixes_caption_files_and_reports_the_ratios(data, capsys):
    module = CaptionDataModule(train=[str(data / "train.json"), {"path": str(data / "test.json"), "weight": 1}],
                               image_root=str(data), image_size=32, batch_size=4, tokenizer_dir=str(data))
    with pytest.raises(ValueError, match=r"data.train\[0\] \(.*train.json\): no weight while others have one"):
        module.setup("fit")
    module = CaptionDataModule(train=[str(data / "train.json"), str(data / "test.json")], image_root=str(data), image_size=32,
                               batch_size=4, tokenizer_dir=str(data), seed=1)
    module.setup("fit")
    sizes, probabilities = module.mixture
    assert len(module.train_set) == sum(sizes) and probabilities == pytest.approx([math.sqrt(s) / sum(map(math.sqrt, sizes))
                                                                                  for s in sizes])
    assert "task mixture (p ~ sqrt(size))" in capsys.readouterr().err
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and isinstance(module.train_sampler, MixtureSampler)


def test_a_stage_1_mixture_refuses_a_vqa_file(data):
    templates = ROOT / "configs" / "instruct" / "templates.yaml"
    module = CaptionDataModule(train=[str(data / "train.json"), str(data / "val_vqa.json")], image_root=str(data),
                               image_size=32, batch_size=2, tokenizer_dir=str(data), templates=str(templates))
    module.setup("fit")
    with pytest.raises(ValueError, match=r"val_vqa.json holds instructions .* this stage trains on captions only"):
        module.train_dataloader()


class Crash(pl.Callback):
    """Ends the process's fit in the middle of a step, as a kill would: nothing is saved."""

    def __init__(self, step: int):
        self.step = step

    def on_before_backward(self, trainer, module, loss):
        if trainer.global_step == self.step:
            raise SystemExit(137)


def fit(data: Path, root: Path, record: Path, *extra: str, crash_at: int | None = None) -> int:
    callbacks = [{"class_path": "resume_helpers.RecordSamples", "init_args": {"path": str(record)}}]
    if crash_at is not None:
        callbacks.append({"class_path": "test_mixture.Crash", "init_args": {"step": crash_at}})
    mixture = json.dumps([{"path": str(data / "train.json"), "weight": 2}, {"path": str(data / "test.json"), "weight": 1}])
    argv = ["stage1", "fit", "--config", str(CONFIG), "--model.tokenizer", str(data), "--model.config", "tiny",
            "--data.train", mixture, "--data.val", "null", "--data.image_root", str(data), "--data.batch_size", "4",
            "--trainer.max_steps", "7", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--model.save_every_n_steps", "3", "--trainer.callbacks", json.dumps(callbacks), *extra]
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def test_a_killed_mixture_run_resumed_from_last_sees_the_samples_of_an_uninterrupted_one(data, tmp_path):
    assert fit(data, tmp_path / "whole", tmp_path / "whole.txt") in (0, None)
    assert fit(data, tmp_path / "runs", tmp_path / "runs.txt", crash_at=4) == 137
    assert torch.load(find_checkpoint("last", tmp_path / "runs"), weights_only=False)["global_step"] == 3
    assert fit(data, tmp_path / "runs", tmp_path / "runs.txt", "--ckpt_path", "last") in (0, None)

    def steps(record: Path) -> dict[str, str]:  # a step run twice (crashed, then redone) keeps its last record
        return dict(line.split(" ", 1) for line in record.read_text().splitlines())

    whole = steps(tmp_path / "whole.txt")
    assert len(whole) == 7 and steps(tmp_path / "runs.txt") == whole
    ids = [i for line in whole.values() for i in json.loads(line)]
    first_file = len(read_samples(data / "train.json", None, {})[1])
    assert min(ids) < first_file <= max(ids)  # both files were drawn from


def test_shard_specs_mix_batch_by_batch_as_lavis_datasets(data, tmp_path):
    specs = []
    for name in ("train", "test"):
        out = tmp_path / name
        assert main(["make-shards", str(data / f"{name}.json"), "--images", str(data), "--out", str(out)]) == 0
        specs.append(str(out / "{00000..00000}.tar"))
    module = CaptionDataModule(train=[{"path": specs[0], "weight": 1}, {"path": specs[1], "weight": 1000}], batch_size=2,
                               tokenizer_dir=str(data), image_size=32, seed=0)
    module.setup("fit")
    sizes, probabilities = module.mixture
    assert sizes == [len(read_samples(data / f"{n}.json", None, {})[1]) for n in ("train", "test")]
    from stages.data.webdataset import stable_id

    test_images = {stable_id(f"image:{e['image_id']}") for e in json.loads((data / "test.json").read_text())}
    batches = list(module.train_dataloader())
    assert len(batches) == sum(sizes) // 2
    assert sum(set(b["image_ids"].tolist()) <= test_images for b in batches) >= len(batches) - 1  # p = 0.999
