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
    # data module restores the position itself (stages.data.sampling), which Lightning's check of the loader cannot see
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
    """Filter the notices above; each library's log handlers are filtered when it is imported, not before, so a
    command that never uses Lightning (caption, search, eval ...) never imports it."""
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for module in ("pytorch_lightning", "lightning", "transformers"):
        after_import(module, _filter_library_logs)


def _filter_library_logs() -> None:
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger()  # sets up the "transformers" handler, which the filter below must see
        hf_logging.disable_progress_bar()  # per-tensor loading bars
    for logger_name in {name for name, _ in _RECORDS}:
        starts = tuple(start for name, start in _RECORDS if name == logger_name)
        logger = logging.getLogger(logger_name)
        for target in [logger, *logger.handlers]:  # a handler's filter also sees the records of child loggers
            if not any(isinstance(f, _DropNotices) for f in target.filters):
                target.addFilter(_DropNotices(starts))


def after_import(module: str, callback) -> None:
    """Call `callback` once `module` is imported: now if it already is, else right after its import finishes."""
    import sys

    if module in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(module, callback))


class _AfterImport:
    """A meta-path finder that finds nothing itself: it wraps the real loader of one module to run a callback."""

    def __init__(self, module: str, callback):
        self.module, self.callback = module, callback

    def find_spec(self, name, path, target=None):
        import importlib.util
        import sys

        if name != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module, callback = spec.loader.exec_module, self.callback

            def exec_then_call(module):
                exec_module(module)
                callback()

            spec.loader.exec_module = exec_then_call
        return spec
