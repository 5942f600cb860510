"""Training checkpoints: where a run keeps them, and `qformer export` from a checkpoint to a model folder."""

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


def export(checkpoint: str, *, out: str, overwrite: bool = False) -> int:
    """Write a self-describing model folder (weights, config, tokenizer) from a training checkpoint of either stage.

    Args:
        checkpoint: a .ckpt written by `qformer stage1 fit` or `qformer stage2 fit` (e.g. ROOT/last.ckpt).
        out: the export folder to write.
        overwrite: replace an existing non-empty --out folder (as a whole, once the new one is complete).
    """
    from qformer.export import save_stage1, save_stage2
    from qformer.files import check_out, read_torch
    from stages.stage1 import Stage1Module
    from stages.stage2 import Stage2Module

    check_out(out, overwrite)
    content = read_torch(checkpoint)
    if not isinstance(content, dict) or not {"pytorch-lightning_version", "state_dict"} <= set(content):
        raise ValueError(f"{checkpoint} is not a Lightning checkpoint (no pytorch-lightning_version and state_dict): "
                         "give a .ckpt written by qformer stage1/stage2 fit")
    if "stage1" in content.get("hyper_parameters", {}):
        module = Stage2Module.load_from_checkpoint(checkpoint, map_location="cpu")
        folder = save_stage2(module.model, module.lm_tokenizer, out, overwrite, source=checkpoint)
    else:
        module = Stage1Module.load_from_checkpoint(checkpoint, map_location="cpu")
        folder = save_stage1(module.model, module.tokenizer, out, overwrite, source=checkpoint)
    print(f"exported to {folder}")
    return 0
