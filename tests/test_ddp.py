"""Both stages under DDP with two CPU processes (gloo), through the real command line."""

import csv
from pathlib import Path

import processes
import pytest

from qformer.bert import load_tokenizer
from qformer.config import preset
from qformer.folders import save_stage1
from qformer.stage1 import Stage1Model
from stages.data.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_data")
    make_dataset(folder, num_images=50, seed=4)
    return folder


def run(stage: str, config: str, data: Path, root: Path, *extra: str) -> list[dict]:
    command = [
        "-m", "stages.cli", stage, "fit", "--config", str(ROOT / "configs" / stage / config),
        "--data.train", str(data / "train.json"), "--data.val", str(data / "val.json"), "--data.image_root", str(data),
        "--data.batch_size", "8", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "12",
        "--trainer.log_every_n_steps", "4", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), *extra,
    ]
    result = processes.run(command, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(next(root.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def test_stage1_ddp_trains_and_validates_with_itm_rerank(data, tmp_path):
    rows = run("stage1", "tiny.yaml", data, tmp_path / "runs", "--model.tokenizer", str(data), "--model.val_retrieval", "itm", "--model.val_k_test", "4")
    assert [r for r in rows if r.get("train/loss_itm")]
    assert [r for r in rows if r.get("val/r_mean")]


def test_stage2_ddp_trains_and_validates_with_captions(data, tmp_path):
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    export = save_stage1(Stage1Model(config), tokenizer, tmp_path / "stage1")
    rows = run("stage2", "tiny.yaml", data, tmp_path / "runs", "--model.stage1", str(export),
               "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder"), "--model.val_max_new_tokens", "4")
    assert [r for r in rows if r.get("train/loss_lm")]
    assert [r for r in rows if r.get("val/cider")]
