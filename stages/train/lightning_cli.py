"""`qformer stage1|stage2 fit|validate`: LightningCLI over a stage's module and the caption data module.

The same function runs a user's command line (a list of arguments) and the demo (a dict of the same
options, as a config file holds them).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from stages.data.captions import CaptionDataModule
from stages.train.checkpoints import RunFiles
from stages.train.resume import AtomicCheckpointIO, StopOnSignal, check_resumable, find_checkpoint

# Given on the command line, each of these replaces the other one from a config file.
EXCLUSIVE_OPTIONS = (("--model.lm_path", "--model.lm_config"),)


class CommandLineError(ValueError):
    """A mistake on the training command line."""


def with_suggestion(message: str, parsers) -> str:
    """`message`, plus the closest valid option when it names an unknown one."""
    import difflib

    options = {o for parser in parsers for action in parser._actions for o in action.option_strings}
    for word in message.replace(",", " ").split():
        close = difflib.get_close_matches(word.split("=")[0].strip("'\""), options, n=1) if word.startswith(("--", "'--")) else []
        if close and close[0] != word:
            return f"{message} (did you mean {close[0]}?)"
    return message


class ValidationReport(Callback):
    """Prints each validation's metrics (they otherwise appear only in metrics.csv)."""

    def on_validation_end(self, trainer: Trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
            print(f"validation at step {trainer.global_step}: {shown}", file=sys.stderr)


def tidy_progress_bar(trainer: Trainer) -> None:
    """Rich's bar reads "Epoch 0/-2" when a run is measured in steps (max_epochs -1): name the step limit instead;
    and the logger's version number (`v_num`) is no metric."""
    from pytorch_lightning.callbacks import RichProgressBar

    bar = trainer.progress_bar_callback
    if bar is None:
        return
    if isinstance(bar, RichProgressBar) and trainer.max_steps > 0:
        bar._get_train_description = lambda epoch: f"Epoch {epoch} (steps up to {trainer.max_steps})"
    metrics = bar.get_metrics
    bar.get_metrics = lambda *args: {k: v for k, v in metrics(*args).items() if k != "v_num"}


class QFormerCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        """As LightningCLI's, without its warning about `args` next to `sys.argv` (`qformer` passes its own argv on),
        and with a mistake reported in one line, with the closest valid option, instead of a 70-line usage."""
        from jsonargparse import ArgumentError

        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        for each in parsers:
            each.exit_on_error = False
        try:
            self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)
        except ArgumentError as error:
            raise CommandLineError(with_suggestion(str(error).strip().splitlines()[-1], parsers)) from None

    def instantiate_classes(self) -> None:
        """Unless --trainer.logger says otherwise: CSV logs always, TensorBoard too when it is installed."""
        super().instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):
            csv = CSVLogger(self.trainer.default_root_dir)
            loggers = [csv]
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                loggers.append(TensorBoardLogger(self.trainer.default_root_dir, version=csv.version))
            self.trainer.loggers = loggers
        self.trainer.callbacks += [ValidationReport(), RunFiles(), StopOnSignal()]
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a strategy's own (DeepSpeed, FSDP)
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        self._resolve_ckpt_path(config)
        tidy_progress_bar(self.trainer)

    def _resolve_ckpt_path(self, config) -> None:
        """`--ckpt_path last|auto`: the newest checkpoint of any run under the root folder (Lightning's own `last`
        looks only in this run's new, empty version folder). The resumed run logs into a new version folder and
        says which checkpoint it continues."""
        if not self.subcommand or "ckpt_path" not in self.config_init[self.subcommand]:
            return
        request = self.config_init[self.subcommand]["ckpt_path"]
        path = find_checkpoint(request, self.trainer.default_root_dir)
        if path is not None:
            check_resumable(path, request, self.trainer.default_root_dir)
        self.config_init[self.subcommand]["ckpt_path"] = path
        config.ckpt_path = path  # the run's config.yaml then names the checkpoint it continued
        if request is not None and path is not None and self.trainer.is_global_zero:
            print(f"resuming from {Path(path).resolve()}", file=sys.stderr)
        elif request == "auto" and self.trainer.is_global_zero:
            print(f"--ckpt_path auto: no checkpoint under {self.trainer.default_root_dir} yet: starting a new run", file=sys.stderr)

    def stopped_by_signal(self) -> int | None:
        """The signal received during a fit that ended without `StoppedBySignal`: a fit that validates nothing stops
        after saving as if it had reached its end, and a signal during the final saves lets them finish. Either way
        the command stops as if the signal had stopped it (a demo goes no further; `qformer` exits 128 + it)."""
        return next((c.received for c in self.trainer.callbacks if isinstance(c, StopOnSignal)), None)


def command_line_wins(argv: list[str]) -> list[str]:
    """An option given on the command line clears the option it excludes, which a config file may have set."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    extra = []
    for pair in EXCLUSIVE_OPTIONS:
        for option, other in (pair, pair[::-1]):
            if option in given and other not in given:
                extra += [other, "null"]
    return argv + extra


def run_training(stage: str, args: list[str] | dict) -> QFormerCLI:
    """Run `fit` or `validate` of stage 1 or 2; `args` is a command line, or a dict {"subcommand": ..., NAME: options}."""
    from stages.train.stage1 import Stage1Module
    from stages.train.stage2 import Stage2Module

    module = Stage1Module if stage == "stage1" else Stage2Module
    if isinstance(args, list):
        args = command_line_wins(args)
    return QFormerCLI(module, CaptionDataModule, args=args, save_config_kwargs={"overwrite": True},
                      parser_kwargs={"prog": f"qformer {stage}"})
