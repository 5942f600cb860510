"""Preemption and resume: a run that is stopped (Ctrl-C, SIGTERM, SLURM's SIGUSR1) or killed continues where it was.

What a checkpoint holds beyond Lightning's own (weights, optimiser, schedule, loop counters):
* every process's RNG states (torch CPU and CUDA, numpy, python), restored just before the first step after a resume;
* the data position (`CaptionDataModule.state_dict`): the data seed, the epoch and how many of its batches were
  trained. The map-style sampler (`ResumableSampler`) then skips exactly those batches, and every sample's
  augmentation is drawn from (seed, epoch, index) (`sample_rng`), not from a stream a restart would reset.
Together: a CPU run killed after the checkpoint at step k and resumed ends with bit-identical weights to a run
that was never interrupted (tests/test_resume.py).

Checkpoints are written atomically (`AtomicCheckpointIO`): a kill during a save leaves the previous file.
`--ckpt_path last` / `auto` find the newest checkpoint under `--trainer.default_root_dir` (`find_checkpoint`); a
damaged one is named, with the one before it, before the run makes its folder (`check_resumable`).
A signal ends a fit within seconds with `StoppedBySignal`, status 128 + the signal (`StopOnSignal`; docs/scaling.md says
why not Lightning's SLURM auto-requeue).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


# --- finding the checkpoint to resume from -------------------------------------------------------------------
def run_checkpoints(root: str | Path) -> list[Path]:
    """The resumable checkpoints of every run under ROOT: each version's `last*.ckpt`, and Lightning's SLURM
    `hpc_ckpt_*.ckpt` in ROOT itself."""
    root = Path(root)
    found = list(root.glob("lightning_logs/version_*/checkpoints/last*.ckpt")) + list(root.glob("hpc_ckpt_*.ckpt"))
    return [path for path in found if path.is_file() and not path.is_symlink()]


def find_checkpoint(request: str | None, root: str | Path) -> str | None:
    """What `--ckpt_path` means: `last` the newest checkpoint under ROOT (an error if there is none: a resume that
    finds nothing must not silently start over), `auto` the same or None (a fresh start: for job scripts that are
    requeued), anything else a file that must exist."""
    if request is None:
        return None
    if request in ("last", "auto"):
        found = run_checkpoints(root)
        if found:
            return str(max(found, key=lambda path: path.stat().st_mtime))
        if request == "auto":
            return None
        raise FileNotFoundError(f"--ckpt_path last: no checkpoint to resume from under {root} (looked for "
                                f"lightning_logs/version_*/checkpoints/last*.ckpt): nothing to resume; start without "
                                f"--ckpt_path, or give --ckpt_path auto to resume only when there is one")
    if not Path(request).is_file():
        raise FileNotFoundError(f"--ckpt_path: checkpoint not found: {request}")
    return request


def check_resumable(path: str, request: str, root: str | Path) -> None:
    """A ValueError naming PATH and the newest readable checkpoint before it when PATH is damaged (cut short by a full
    disk or an interrupted copy): read before the run creates its folder, so that a failed resume leaves nothing."""
    damage = checkpoint_damage(path)
    if damage is None:
        return
    older = [p for p in sorted(run_checkpoints(root), key=lambda p: p.stat().st_mtime, reverse=True)
             if p.resolve() != Path(path).resolve() and checkpoint_damage(p) is None]
    which = "the one before it" if request in ("last", "auto") else "the newest readable one"
    instead = (f"resume from {which} with --ckpt_path {older[0].resolve()}" if older else
               f"no other readable checkpoint under {Path(root).resolve()}: start without --ckpt_path")
    raise ValueError(f"--ckpt_path {request}: cannot read {Path(path).resolve()} ({damage}); {instead}")


def checkpoint_damage(path: str | Path) -> str | None:
    """What is wrong with a checkpoint file, or None. Reads its zip directory and its pickle (checked against the
    archive's CRC), not the tensors: cheap for a checkpoint of any size."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            if not pickles:
                return "not a PyTorch checkpoint: no data.pkl in it"
            archive.read(pickles[0])
    except zipfile.BadZipFile as error:
        return f"damaged or cut short: {error}"
    except (OSError, zipfile.LargeZipFile, EOFError) as error:
        return f"unreadable: {error}"
    return None


# --- atomic saves --------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `.NAME.partial-PID` beside the checkpoint, syncs it, then renames it over NAME: a kill during a
    save leaves the previous checkpoint whole (Lightning's own transaction writes through the system's temporary
    folder, which is a copy, not a rename, when it is another file system)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


# --- RNG states ------------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """This process's RNG states, as tensors and plain containers (checkpoints are read weights-only)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- stopping on a signal ---------------------------------------------------------------------------------------
class StoppedBySignal(SystemExit):
    """A fit stopped by a signal after saving its resume checkpoint. A SystemExit with status 128 + the signal's number
    (143 for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C), as if the signal had killed the process: a scheduler or a job
    script that requeues on a failure sees one, and nothing on the way out (the demo, a later stage) goes on."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint


class StopOnSignal(pl.Callback):
    """SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (SLURM's `--signal=USR1@SECONDS` before a preemption or the time limit):
    the step in progress completes, every process saves `last.ckpt` at that step and the fit ends at once: with
    `StoppedBySignal` where a validation would begin (no validation, no best checkpoint from a partial epoch), else
    as a fit that reached its end, within seconds of the signal (SLURM kills ~30-90 s after SIGTERM); `qformer` then
    exits 128 + the signal. A signal during a validation stops it at its next batch the same way. A second signal of
    any of them ends the process at once, saving nothing more."""

    def __init__(self):
        self.received: int | None = None
        self.stopped: StoppedBySignal | None = None  # once the checkpoint is saved
        self._previous: dict = {}
        self._trainer: pl.Trainer | None = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not _in_main_thread():
            return
        self._trainer = trainer
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum, frame) -> None:
        if self.received is not None:
            self._restore()
            print(f"\nreceived {signal.Signals(signum).name} again: stopping now, without saving", file=sys.stderr)
            _kill_launched_processes(self._trainer)
            raise SystemExit(128 + signum)
        self.received = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
              f"(a second signal stops at once)", file=sys.stderr)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        """Save now and stop; the step's metrics are still logged (Lightning logs them after this hook). A validation
        would follow, as Lightning validates when a fit is stopped: `on_validation_start` ends the fit there."""
        if self._signalled(trainer, module) and self.stopped is None:
            self.stopped = self._save_and_report(trainer)
            trainer.should_stop = True

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.stopped is not None and trainer.state.fn == "fit":
            raise self.stopped

    def on_validation_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        """A signal during a validation: the resumed run goes on after it (the rest of this one is not run)."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._signalled(trainer, module):
            raise self._save_and_report(trainer)

    def _signalled(self, trainer: pl.Trainer, module: pl.LightningModule) -> bool:
        received = self.received or 0
        if trainer.world_size > 1:  # one process's signal stops them all, at the same step
            received = int(trainer.strategy.reduce(torch.tensor(received, device=module.device), reduce_op="max"))
        self.received = received or None
        return bool(received)

    def _save_and_report(self, trainer: pl.Trainer) -> StoppedBySignal:
        path = save_last_checkpoint(trainer).resolve()  # absolute: the hint is valid from any directory
        if trainer.is_global_zero:
            print(f"stopped by {signal.Signals(self.received).name} at step {trainer.global_step}: checkpoint {path}; "
                  f"resume with the same command (in {Path.cwd()}) and --ckpt_path last", file=sys.stderr)
        return StoppedBySignal(self.received, path)

    def teardown(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def _kill_launched_processes(trainer: pl.Trainer | None) -> None:
    """The processes Lightning started for the other devices of this machine, which would otherwise wait for this
    one in their next collective (as Lightning does on a KeyboardInterrupt)."""
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if isinstance(launcher, _SubprocessScriptLauncher):
        launcher.kill(signal.SIGKILL)


def save_last_checkpoint(trainer: pl.Trainer) -> Path:
    """`last.ckpt` of the run's ModelCheckpoint, now. The callback is told, so that it does not save the same step
    again at the epoch's or the run's end: that save would record the interrupted epoch as finished."""
    callback = trainer.checkpoint_callback
    path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    callback.last_model_path = str(path)  # before saving: it is part of the callback's saved state
    trainer.save_checkpoint(path)
    callback._last_global_step_saved = trainer.global_step
    callback._last_checkpoint_saved = str(path)
    return path


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
