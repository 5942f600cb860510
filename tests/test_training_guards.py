"""A step with a non-finite loss or gradient, or without one readable image, is skipped on every process alike;
too many in a row stop the run with a clear message before a bad update reaches the weights."""

import json
from pathlib import Path

import processes  # noqa: F401 (its fork server preloads the heavy imports)
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

from stages.cli import main
from stages.data.captions import CaptionDataModule
from stages.data.synthetic import make_dataset
from stages.train.base import TrainingStopped
from stages.train.stage1 import Stage1Module

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stage1" / "tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guard_data")
    make_dataset(folder, num_images=40, seed=2)
    return folder


class PoisonedStage1(Stage1Module):
    """Stage 1 whose loss is NaN at the listed global steps (on the listed ranks)."""

    def __init__(self, *args, nan_steps: tuple = (), nan_ranks: tuple = (0,), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_steps, self.nan_ranks = set(nan_steps), set(nan_ranks)

    def training_loss(self, batch):
        loss = super().training_loss(batch)
        poisoned = self.global_step in self.nan_steps and self.global_rank in self.nan_ranks
        return loss * float("nan") if poisoned else loss


def fit(module, data, root, max_steps, precision="32", **trainer):
    datamodule = CaptionDataModule(train=str(data / "train.json"), image_root=str(data), image_size=32, batch_size=8, hflip=False)
    trainer = pl.Trainer(accelerator="cpu", devices=trainer.pop("devices", 1), max_steps=max_steps, precision=precision,
                         default_root_dir=str(root), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1.0, **trainer)
    trainer.fit(module, datamodule)
    return module


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_a_nan_step_is_skipped_and_training_goes_on(data, tmp_path, precision):
    module = PoisonedStage1(tokenizer=str(data), lr=1e-3, warmup_steps=1, nan_steps=(2,))
    before = trainable(module)
    fit(module, data, tmp_path, max_steps=5, precision=precision)
    assert (module.skipped_steps, module.applied_steps) == (1, 4)
    after = trainable(module)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the other steps did train


def test_skipped_steps_never_touch_the_weights_and_too_many_stop_the_run(data, tmp_path):
    module = PoisonedStage1(tokenizer=str(data), nan_steps=range(100), max_consecutive_skips=3)
    before = trainable(module)
    with pytest.raises(TrainingStopped, match="after 3 skipped steps in a row \\(last: loss is nan\\)"):
        fit(module, data, tmp_path, max_steps=10)
    assert module.applied_steps == 0
    for name, value in trainable(module).items():
        assert torch.equal(value, before[name]), name  # no update, no weight decay, nothing


def test_a_diverging_run_exits_non_zero_with_one_line(data, tmp_path, capsys):
    argv = ["stage1", "fit", "--config", str(CONFIG), "--model.tokenizer", str(data), "--model.lr", "1e10",
            "--model.warmup_steps", "1", "--model.max_consecutive_skips", "3", "--data.train", str(data / "train.json"),
            "--data.val", "null", "--data.image_root", str(data), "--data.batch_size", "8",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "30", "--trainer.enable_progress_bar", "false"]
    capsys.readouterr()
    assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qformer stage1: error: stopped after 3 skipped steps in a row")


def test_a_training_split_without_one_readable_image_fails(data, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    entries = []
    for n in range(16):
        (tmp_path / "images" / f"{n}.jpg").write_text("not an image")
        entries.append({"image": f"images/{n}.jpg", "caption": "a red circle"})
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    argv = ["stage1", "fit", "--config", str(CONFIG), "--model.tokenizer", str(data), "--data.train", str(tmp_path / "ann.json"),
            "--data.val", "null", "--data.image_root", str(tmp_path), "--data.batch_size", "8",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false"]
    capsys.readouterr()
    assert main(argv) == 1
    assert "no step was applied: all 2 training steps were skipped (last: no readable image in the batch" in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # nothing that looks like a trained model


def test_a_validation_split_without_one_readable_image_fails(data, tmp_path, capsys):
    (tmp_path / "val.json").write_text(json.dumps([{"image": "missing.png", "caption": "a red circle"}]))
    argv = ["stage1", "fit", "--config", str(CONFIG), "--model.tokenizer", str(data), "--data.train", str(data / "train.json"),
            "--data.val", str(tmp_path / "val.json"), "--data.image_root", str(data), "--data.batch_size", "8",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false"]
    capsys.readouterr()
    assert main(argv) == 1
    assert "data.val: no readable image in the validation split" in capsys.readouterr().err


# --- two processes: a NaN on one rank skips the step on both ---------------------------------------------------
class RecordingStage1(PoisonedStage1):
    def __init__(self, *args, out: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def on_fit_end(self) -> None:
        weights = sum(p.double().sum().item() for p in self.model.parameters() if p.requires_grad)
        Path(f"{self.out}.{self.global_rank}").write_text(json.dumps([self.skipped_steps, self.applied_steps, weights]))


def test_ddp_ranks_skip_together(data, tmp_path):
    out = str(tmp_path / "rank")
    module = RecordingStage1(tokenizer=str(data), lr=1e-3, warmup_steps=1, nan_steps=(1,), nan_ranks=(1,), out=out)
    ddp = DDPStrategy(start_method="forkserver")  # children forked warm: see tests/processes.py
    fit(module, data, tmp_path, max_steps=3, devices=2, strategy=ddp)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert ranks[0][:2] == ranks[1][:2] == [1, 2]  # rank 0's own step was fine, but it skipped it too
    assert ranks[0][2] == ranks[1][2]  # and the weights stayed identical across ranks


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class GradientPoisonedStage1(Stage1Module):
    def training_loss(self, batch):
        loss = super().training_loss(batch)
        return _NaNGradient.apply(loss) if self.global_step == 1 else loss


def test_a_finite_loss_with_a_nan_gradient_is_skipped_too(data, tmp_path):
    module = GradientPoisonedStage1(tokenizer=str(data), lr=1e-3, warmup_steps=1)
    fit(module, data, tmp_path, max_steps=3)
    assert (module.skipped_steps, module.applied_steps, module.last_skip_reason) == (1, 2, "non-finite gradient")
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_all_finite_finds_any_nan_or_inf_and_no_overflow_of_its_own():
    from stages.train.base import all_finite

    finite = [torch.randn(5, 3), torch.randn(7), torch.full((4,), 6e4, dtype=torch.float16)]  # fp16: its norm needs fp32
    assert all_finite(finite)
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = [t.clone() for t in finite]
        broken[1][3] = bad
        assert not all_finite(broken)
