"""A signal stops a fit within seconds and a command at once: SIGTERM mid-epoch saves the resume checkpoint and exits
143 without validating or writing a best checkpoint, and `--ckpt_path last` then ends bit-identical to an uninterrupted
run; a second signal ends the process without saving; a damaged resume checkpoint is one line naming the one before it;
the demo stops after a stopped stage and says which command resumes it."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import processes
import pytest
import torch

from stages.data.synthetic import make_dataset
from stages.train.resume import STOP_SIGNALS, StopOnSignal, find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "stage1" / "tiny.yaml"
STEPS = 5  # within the first epoch (6 batches): only a stop could make it validate
SIGNAL_STEP = 2  # SIGTERM at the start of step 3: the run saves at step 3 and stops


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signal_data")
    make_dataset(folder, num_images=12, seed=3)
    return folder


def fit(data: Path, root: Path, *extra: str, callbacks: tuple = ()) -> subprocess.CompletedProcess:
    """`qformer stage1 fit` on the tiny config, validation configured (no sanity check: it would only cost time)."""
    validations = {"class_path": "resume_helpers.RecordValidation", "init_args": {"path": str(root) + ".validations"}}
    argv = [
        "-m", "stages.cli", "stage1", "fit", "--config", str(CONFIG), "--model.tokenizer", str(data),
        "--data.train", str(data / "train.json"), "--data.val", str(data / "val.json"), "--data.image_root", str(data),
        "--data.batch_size", "8", "--trainer.max_steps", str(STEPS), "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", json.dumps([validations, *callbacks]), *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    return processes.run(argv, env=env, timeout=300)


def sigterm_at(step: int, stamp: Path, times: int = 1) -> dict:
    return {"class_path": "resume_helpers.StampedSignalAt",
            "init_args": {"step": step, "signal_name": "SIGTERM", "stamp": str(stamp), "times": times}}


def seconds_to_exit(stamp: Path, finished: float) -> float:
    return finished - float(stamp.read_text())


def validations(root: Path) -> list[str]:
    record = Path(str(root) + ".validations")
    return record.read_text().split() if record.exists() else []


def checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("lightning_logs/version_*/checkpoints/*.ckpt"))


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    """A fit sent SIGTERM mid-epoch: (its root folder, the finished process, seconds from the signal to its exit)."""
    root = tmp_path_factory.mktemp("stopped") / "runs"
    stamp = root.parent / "signal_time"
    run = fit(data, root, callbacks=(sigterm_at(SIGNAL_STEP, stamp),))
    return root, run, seconds_to_exit(stamp, time.time())


def test_sigterm_saves_and_exits_within_seconds_without_validating(stopped):
    root, run, seconds = stopped
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
    assert seconds < 10, seconds
    assert validations(root) == [] and "validation at step" not in run.stderr  # the stop ran no validation
    assert checkpoints(root) == ["last.ckpt"]  # and wrote no best checkpoint from a partial epoch
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == SIGNAL_STEP + 1
    assert f"checkpoint {last.resolve()}" in run.stderr  # an absolute path: valid from any directory
    assert "Traceback" not in run.stderr


def test_the_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(data, stopped, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(stopped[0], root)
    resumed = fit(data, root, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {(root / 'lightning_logs/version_0/checkpoints/last.ckpt').resolve()}" in resumed.stderr
    whole = fit(data, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = torch.load(find_checkpoint("last", tmp_path / "whole"), weights_only=False)
    got = torch.load(find_checkpoint("last", root), weights_only=False)
    assert got["global_step"] == expected["global_step"] == STEPS
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    for index, state in expected["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["optimizer_states"][0]["state"][index][name], value), (index, name)


def test_a_second_sigterm_ends_the_fit_at_once_without_saving(data, tmp_path):
    root, stamp = tmp_path / "runs", tmp_path / "signal_time"
    run = fit(data, root, callbacks=(sigterm_at(SIGNAL_STEP, stamp, times=2),))
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
    assert seconds_to_exit(stamp, time.time()) < 10
    assert checkpoints(root) == []  # the step in progress was not finished, nor saved
    assert validations(root) == []
    assert "SIGTERM again: stopping now" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_damaged_resume_checkpoint_is_one_line_naming_the_one_before(data, stopped, tmp_path):
    root = tmp_path / "runs"
    older = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    damaged = root / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    for folder in ("version_0", "version_1"):
        shutil.copytree(stopped[0] / "lightning_logs" / "version_0", root / "lightning_logs" / folder)
    damaged.write_bytes(damaged.read_bytes()[:5000])  # as a full disk or a copy cut short leaves it
    os.utime(older, (time.time() - 60, time.time() - 60))
    run = fit(data, root, "--ckpt_path", "last")
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert str(damaged.resolve()) in errors[0] and f"--ckpt_path {older.resolve()}" in errors[0], errors[0]
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0", "version_1"]  # no new run folder


def test_any_second_stop_signal_ends_at_once_with_its_status():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop = StopOnSignal()
    stop.on_train_start(None, None)
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # noted: the step in progress finishes and is saved
        assert stop.received == signal.SIGTERM
        with pytest.raises(SystemExit) as exit:
            os.kill(os.getpid(), signal.SIGINT)
        assert exit.value.code == 128 + signal.SIGINT
        assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    finally:
        stop.teardown(None, None, "fit")


def test_a_signal_after_the_last_step_still_stops_the_command():
    """A signal during the fit's last validation or final save: the fit ends, but a command that runs several stages
    (the demo) must not go on, and `qformer` exits 128 + the signal."""
    from stages.train.lightning_cli import QFormerCLI

    stop = StopOnSignal()
    stop.received = signal.SIGTERM
    cli = SimpleNamespace(trainer=SimpleNamespace(callbacks=[stop]))
    assert QFormerCLI.stopped_by_signal(cli) == signal.SIGTERM


def test_the_demo_stops_after_a_stopped_stage_and_names_the_command_that_resumes_it(monkeypatch, tmp_path, capsys):
    import stages.train.lightning_cli
    from stages.demo import pipeline
    from stages.train.resume import StoppedBySignal

    def stopped_fit(stage, args):
        raise StoppedBySignal(signal.SIGTERM, Path("runs/last.ckpt"))

    monkeypatch.setattr(stages.train.lightning_cli, "run_training", stopped_fit)
    monkeypatch.chdir(tmp_path)
    config = Path("configs") / "stage2.yaml"
    config.parent.mkdir()
    config.write_text("trainer: {}\n")
    with pytest.raises(SystemExit) as exit:
        pipeline._train("stage2", config)
    assert exit.value.code == 128 + signal.SIGTERM
    resume = f"qformer stage2 fit --config {tmp_path / 'configs' / 'stage2.yaml'} --ckpt_path last"
    assert resume in capsys.readouterr().err


def test_the_demo_stopped_outside_a_fit_says_it_starts_over(monkeypatch, capsys):
    from stages.demo import pipeline
    from stages.demo.settings import DemoSettings

    def stopped(settings):  # as `qformer`'s SIGTERM handler stops an export or an evaluation
        raise SystemExit(128 + signal.SIGTERM)

    monkeypatch.setattr(pipeline, "run_demo", stopped)
    from stages.demo.command import demo

    with pytest.raises(SystemExit) as exit:
        demo(DemoSettings())
    assert exit.value.code == 128 + signal.SIGTERM
    assert "rerun qformer demo to start over" in capsys.readouterr().err
