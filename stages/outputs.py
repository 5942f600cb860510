"""The result files a command writes (--json, --predictions, --save-scores): checked before any work, so that a
run does not end in an error after hours because its output cannot be written."""

from __future__ import annotations

import json as json_io
from pathlib import Path


def check_output_files(**paths: str | None) -> None:
    """Fail before any work when a result file could not be written (its folder is missing, or it is a folder)."""
    for option, path in paths.items():
        if path is None:
            continue
        if Path(path).is_dir() or not Path(path).parent.is_dir():
            raise ValueError(f"--{option.replace('_', '-')} {path}: " + ("is a folder" if Path(path).is_dir() else "its folder does not exist"))


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json_io.dumps(data, indent=2) + "\n")
