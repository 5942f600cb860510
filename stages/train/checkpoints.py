"""Training checkpoints: where a run keeps them (the run folder's files, the last and the best checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class RunFiles(pl.Callback):
    """At the end of `fit`: `ROOT/last.ckpt` and `ROOT/best.ckpt` point at this run's checkpoints, and the run says
    where its checkpoints and logs are. ROOT is `--trainer.default_root_dir`; every run keeps its own
    `lightning_logs/version_N/`, so the links always name the newest fit's files."""

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        lines = []
        for name, path in (("last", last_checkpoint(trainer)), ("best", _best(trainer))):
            if path and Path(path).is_file():
                link = root / f"{name}.ckpt"
                link.unlink(missing_ok=True)
                link.symlink_to(os.path.relpath(path, root))
                lines.append(f"  {name + ' checkpoint':<16} {link} -> {path}")
        log_dir = trainer.loggers[0].log_dir if trainer.loggers else None  # (trainer.log_dir is a collective call)
        if log_dir:
            lines.append(f"  {'logs':<16} {log_dir}")
        if lines:
            print("\n".join(["run files:", *lines]))


def _checkpoint_callbacks(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    return [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The run's `last.ckpt`, once it has been saved."""
    return next((c.last_model_path for c in _checkpoint_callbacks(trainer) if c.last_model_path), None)


def _best(trainer: pl.Trainer) -> str | None:
    monitored = [c for c in _checkpoint_callbacks(trainer) if c.monitor]
    return monitored[0].best_model_path if monitored and monitored[0].best_model_path else None
