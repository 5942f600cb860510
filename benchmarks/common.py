"""Small helpers shared by the benchmark scripts: timing and a printed table."""

from __future__ import annotations

import time
from collections.abc import Callable

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
