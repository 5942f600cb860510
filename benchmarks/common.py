"""Small helpers shared by the benchmark scripts: timing, a printed table, and the dated results file."""

from __future__ import annotations

import csv
import datetime
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_ms(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `step` in milliseconds, synchronising CUDA around each call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}"


# docs/benchmarks.csv: one line per measured row, never rewritten, so every figure keeps its date and machine.
RESULTS_CSV = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.csv"
CSV_COLUMNS = ["date", "machine", "command", "row", "reference", "this", "unit", "speedup", "reference_peak_mib",
               "this_peak_mib", "note"]


def append_results(rows: list[dict], machine: str, command: str, path: Path = RESULTS_CSV) -> None:
    """Append `rows` (dicts with some of CSV_COLUMNS) to the results file, dated today; the header if it is new."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, restval="")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"date": datetime.date.today().isoformat(), "machine": machine, "command": command, **row})
