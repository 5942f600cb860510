"""The demo's pictures: loss curves of the three trainings, and test images with their generated captions."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def _read_metrics(run_dir: Path) -> list[dict]:
    files = sorted(run_dir.rglob("metrics.csv"))
    if not files:
        return []
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def plot_losses(out: Path, lm_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    lm_losses = lm_path / "pretraining_losses.json"
    if lm_losses.is_file():
        axes[0].plot(json.loads(lm_losses.read_text()))
        axes[0].set(title="stand-in LLM pre-training (text after an object context)", xlabel="step", ylabel="loss")
    else:  # a real pretrained LLM, used as it is
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no LLM training here:\nthe pretrained LLM is used as it is", ha="center", va="center")
    rows = _read_metrics(out / "runs" / "stage1")
    for name in ("itc", "itm", "itg"):
        points = [(int(r["step"]), float(r[f"train/loss_{name}"])) for r in rows if r.get(f"train/loss_{name}")]
        if points:  # a run shorter than the logging interval has none
            axes[1].plot(*zip(*points), label=name.upper())
    axes[1].set(title="stage 1", xlabel="step", ylabel="loss")
    if axes[1].lines:
        axes[1].legend()
    source = out / "runs" / "stage2_source"  # the transfer route (--lm smollm2): the stand-in's stage 2 came first
    for run, label in ((source, "stand-in LM (transfer source)"), (out / "runs" / "stage2", "SmolLM2 (transferred)")):
        rows = _read_metrics(run) if run.is_dir() else []
        points = [(int(r["step"]), float(r["train/loss_lm"])) for r in rows if r.get("train/loss_lm")]
        if points:
            axes[2].plot(*zip(*points), label=label if source.is_dir() else None)
    axes[2].set(title="stage 2 (frozen LM)", xlabel="step", ylabel="LM loss")
    if source.is_dir() and axes[2].lines:
        axes[2].legend()
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_samples(out: Path, data: Path, entries: list[dict], predictions: dict[str, str], count: int = 12) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = entries[:count]
    fig, axes = plt.subplots(3, 4, figsize=(14, 11))
    for ax, entry in zip(axes.flat, shown):
        ax.imshow(Image.open(data / entry["image"]))
        ax.set_axis_off()
        ok = all(f"{o['color']} {o['shape']}" in predictions.get(str(entry["image_id"]), "") for o in entry["objects"])
        ax.set_title(_wrap(predictions.get(str(entry["image_id"]), "")), fontsize=9, color="darkgreen" if ok else "darkred")
    fig.suptitle("held-out test images and their generated captions (green: every colour and shape right)")
    fig.tight_layout()
    path = out / "samples.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 32) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
