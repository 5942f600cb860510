"""Callbacks the resume tests give `qformer stage1 fit` (by class path) in a child process."""

import os
import signal

import pytorch_lightning as pl
import torch


class RecordSamples(pl.Callback):
    """Appends `STEP SAMPLE_IDS` for every training batch to `path` (`path.rankN` for each process with `per_rank`)."""

    def __init__(self, path: str, per_rank: bool = False):
        self.path, self.per_rank = path, per_rank

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        path = f"{self.path}.rank{trainer.global_rank}" if self.per_rank else self.path
        with open(path, "a") as f:
            f.write(f"{trainer.global_step} {batch['sample_ids'].tolist()}\n")


class SignalAt(pl.Callback):
    """Sends `signal` to this process once, in the step that follows optimizer step `step`: at the batch's start
    (a signal the run handles) or in its backward pass (SIGKILL: work in progress is lost)."""

    def __init__(self, step: int, signal_name: str, in_backward: bool = False):
        self.step, self.signum, self.in_backward = step, getattr(signal, signal_name), in_backward

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if not self.in_backward and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_before_backward(self, trainer, module, loss):
        if self.in_backward and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class StampedSignalAt(SignalAt):
    """Sends `signal` `times` times at the start of the step that follows optimizer step `step`, and writes the time of the
    first one to `stamp` (the signal tests measure how long the run takes to exit after it)."""

    def __init__(self, step: int, signal_name: str, stamp: str, times: int = 1):
        super().__init__(step, signal_name)
        self.stamp, self.times = stamp, times

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        import time

        with open(self.stamp, "w") as f:
            f.write(str(time.time()))
        for _ in range(self.times):
            os.kill(os.getpid(), self.signum)


class RecordValidation(pl.Callback):
    """Appends `STEP` to `path` for every validation of a fit that ran a batch (the sanity check excepted)."""

    def __init__(self, path: str):
        self.path = path

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and batch_idx == 0:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step}\n")


class Killed(RuntimeError):
    """What `FailAt` raises."""


class FailAt(pl.Callback):
    """Raises `Killed` in the backward pass of the step that follows optimizer step `step`: an in-process stand-in for
    SIGKILL (that step's work is lost, the checkpoints written before it stay), without the seconds a child process
    takes to start."""

    def __init__(self, step: int):
        self.step = step

    def on_before_backward(self, trainer, module, loss):
        if trainer.global_step == self.step:
            raise Killed(f"killed in step {self.step + 1}'s backward")


def assert_same_training_state(expected: dict, got: dict) -> None:
    """Two Lightning checkpoints hold the same weights, schedule and AdamW moments, bit for bit."""
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    assert got["lr_schedulers"] == expected["lr_schedulers"]
    moments, expected_moments = got["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"]
    assert moments.keys() == expected_moments.keys()
    for index, state in expected_moments.items():
        for name, value in state.items():
            assert torch.equal(moments[index][name], value), (index, name)
