"""What the user sees: progress bars, metrics, our own messages and real warnings, not library notices that
nobody can act on. Each filter names one notice precisely; no warning category is silenced as a whole."""

from __future__ import annotations

import functools
import logging
import warnings

# (module the warning comes from or None, message regex) -- warnings.warn notices
_WARNINGS = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # Lightning: we pick the logger ourselves
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's internals on newer torch
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen towers, on purpose
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated",  # inside Lightning's own all_gather
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",  # the
    # data module restores the position itself (stages.resume), which Lightning's check of the loader cannot see
    r"Your `IterableDataset` has `__len__` defined",  # the shard stream's length is each worker's fixed count, by design
)
# log records (logger name, message start)
_RECORDS = (
    ("pytorch_lightning", "💡 Tip"),  # advertisements for litlogger / litmodels
    ("lightning.pytorch", "💡 Tip"),
    ("pytorch_lightning", "The following callbacks returned in `LightningModule.configure_callbacks` will override"),
    ("transformers", "The new embeddings will be initialized from a multivariate normal distribution"),
    ("transformers", "The new lm_head weights will be initialized from a multivariate normal distribution"),
)


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


@functools.cache  # once per process: `qformer` may be called many times from Python (tests, notebooks)
def quiet_library_notices() -> None:
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    import importlib

    from transformers.utils import logging as hf_logging

    importlib.import_module("pytorch_lightning")  # each library sets up its own handler on import: filter that one
    hf_logging.get_logger()  # the "transformers" handler
    for logger_name in {name for name, _ in _RECORDS}:
        starts = tuple(start for name, start in _RECORDS if name == logger_name)
        logger = logging.getLogger(logger_name)
        for target in [logger, *logger.handlers]:  # a handler's filter also sees the records of child loggers
            target.addFilter(_DropNotices(starts))

    hf_logging.disable_progress_bar()  # per-tensor loading bars
