"""A stopped or killed run resumes where it was: `--ckpt_path last` after SIGTERM (checkpoint at the step in progress)
and after SIGKILL (checkpoint every N steps) ends with bit-identical weights to an uninterrupted run, having seen the
same samples at the same steps."""

import json
import os
import signal
import subprocess
from pathlib import Path

import processes
import pytest
import torch

from stages.data.synthetic import make_dataset
from stages.train.resume import AtomicCheckpointIO, find_checkpoint

from resume_helpers import assert_same_training_state

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "stage1" / "tiny.yaml"
STEPS = 11  # 6 batches per epoch: the run crosses an epoch end, and both interruptions are mid-epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume_data")
    make_dataset(folder, num_images=12, seed=3)
    return folder


def fit(data: Path, root: Path, record: Path, *extra: str, callbacks: tuple = ()) -> subprocess.CompletedProcess:
    return start(data, root, record, *extra, callbacks=callbacks).finish(timeout=300)


def start(data: Path, root: Path, record: Path, *extra: str, callbacks: tuple = ()) -> processes.Child:
    """The fit in a subprocess of one thread, left running: two of them share the 2 cores of a CI machine."""
    callbacks = [{"class_path": "resume_helpers.RecordSamples", "init_args": {"path": str(record)}}, *callbacks]
    argv = [
        "-m", "stages.cli", "stage1", "fit", "--config", str(CONFIG), "--model.tokenizer", str(data),
        "--data.train", str(data / "train.json"), "--data.val", str(data / "val.json"), "--data.image_root", str(data),
        "--data.batch_size", "8", "--data.hflip", "true", "--trainer.max_steps", str(STEPS),
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", json.dumps(callbacks), *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    return processes.start(argv, env=env)  # output to files: nobody reads the children's output while they run


def steps_seen(record: Path) -> dict[int, str]:
    """Step -> sample ids; a step run twice (killed, then redone after the resume) keeps its last record."""
    return dict(line.split(" ", 1) for line in record.read_text().splitlines())


def final_weights(root: Path) -> dict:
    newest = find_checkpoint("last", root)
    return torch.load(newest, map_location="cpu", weights_only=False)


def signal_at(step: int, name: str, in_backward: bool = False) -> dict:
    return {"class_path": "resume_helpers.SignalAt", "init_args": {"step": step, "signal_name": name, "in_backward": in_backward}}


def test_stopped_then_killed_run_resumes_to_identical_weights(data, tmp_path):
    whole = start(data, tmp_path / "whole", tmp_path / "whole.txt")  # the uninterrupted run, beside the others

    runs, record = tmp_path / "interrupted", tmp_path / "interrupted.txt"
    # SIGTERM while step 4 runs: it completes, is saved, and the run exits as if terminated.
    stopped = fit(data, runs, record, callbacks=(signal_at(3, "SIGTERM"),))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 4" in stopped.stderr
    assert torch.load(find_checkpoint("last", runs), weights_only=False)["global_step"] == 4
    # Resumed, then SIGKILLed in step 9's backward: the checkpoint every 4 steps (step 8) is what survives.
    killed = fit(data, runs, record, "--ckpt_path", "last", "--model.save_every_n_steps", "4", "--data.num_workers", "2",
                 callbacks=(signal_at(8, "SIGKILL", in_backward=True),))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load(find_checkpoint("last", runs), weights_only=False)["global_step"] == 8
    resumed = fit(data, runs, record, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    whole = whole.finish(timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    assert steps_seen(record) == steps_seen(tmp_path / "whole.txt")  # the data position survived both interruptions
    expected, got = final_weights(tmp_path / "whole"), final_weights(runs)
    assert got["global_step"] == expected["global_step"] == STEPS
    assert_same_training_state(expected, got)


def test_ckpt_path_last_without_a_checkpoint_fails_and_auto_starts_fresh(data, tmp_path):
    missing = fit(data, tmp_path / "none", tmp_path / "none.txt", "--ckpt_path", "last")
    assert missing.returncode == 2
    assert "--ckpt_path last: no checkpoint to resume from" in missing.stderr
    assert not (tmp_path / "none.txt").exists()  # no step was trained
    assert find_checkpoint("auto", tmp_path / "none") is None


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as a kill would stop it

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_ctrl_c_asks_for_a_stop_at_the_step_end_and_a_second_one_stops_at_once():
    from stages.train.resume import STOP_SIGNALS, StopOnSignal

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop = StopOnSignal()
    stop.on_train_start(None, None)
    try:
        assert all(signal.getsignal(s) == stop._note for s in STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGINT)  # handled: noted, no KeyboardInterrupt
        assert stop.received == signal.SIGINT
        with pytest.raises(SystemExit) as exit:  # not KeyboardInterrupt: Lightning turns that into exit status 1
            os.kill(os.getpid(), signal.SIGINT)
        assert exit.value.code == 128 + signal.SIGINT
        assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before  # the second one gave the handlers back
    finally:
        stop.teardown(None, None, "fit")
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_the_demo_stops_when_a_signal_stopped_its_training(monkeypatch, tmp_path):
    """After a stopped fit the demo must not go on to stage 2 or evaluation with a half-trained model."""
    from types import SimpleNamespace

    import stages.train.lightning_cli
    from stages.demo import pipeline

    stopped = SimpleNamespace(stopped_by_signal=lambda: signal.SIGTERM, trainer=None)
    monkeypatch.setattr(stages.train.lightning_cli, "run_training", lambda stage, args: stopped)
    config = tmp_path / "stage1.yaml"
    config.write_text("trainer: {}\n")
    with pytest.raises(SystemExit) as exit:
        pipeline._train("stage1", config)
    assert exit.value.code == 128 + signal.SIGTERM
