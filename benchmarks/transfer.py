"""Stage 2 into a new LM, four ways at the same step budget: time to quality (issue 28's side-by-side).

    qformer demo --lm smollm2 --out OUT          # the stand-in's stage 2 (the transfer source) and its data
    python benchmarks/transfer.py --demo OUT     # four SmolLM2 stage-2 fits of the demo's length, one after another

Variants, all against SmolLM2 with the demo's stage-2 settings (batch, lr, schedule, bf16 where the CPU has it):
- direct:   the Q-Former of the stage-1 export, a new projection (stage 2 as before transfer existed);
- transfer: the Q-Former of the stand-in OPT's stage-2 export (`model.init_from`), a new projection;
- warmup:   transfer + the projection alone for the first tenth of the steps at 5x lr (what the demo runs);
- lstsq:    warmup + the new projection initialised as the old one followed by a ridge map between the two LMs'
            input embeddings (`model.init_projection lstsq`).

Every `--eval-every` steps the training pauses and captions `--eval-images` test images (greedy, from the feature
cache): attribute accuracy (every object's colour and shape named). "s to 40 %" is the training time (evaluation
excluded) until the first evaluation at or above 40 %. The final row per variant is the validation loss at the end.
Run it alone on the machine, or with `--threads 1` beside other work: accuracies do not depend on the load, seconds do.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import print_table  # noqa: E402

VARIANTS = ("direct", "transfer", "warmup", "lstsq")


def variant_config(demo: Path, variant: str, out: Path, overrides: list[str] = ()) -> dict:
    """The demo's SmolLM2 stage-2 config, changed for one variant (and by `overrides`: "section.key=YAML value")."""
    config = yaml.safe_load((demo / "configs" / "stage2.yaml").read_text())
    for override in overrides:
        key, value = override.split("=", 1)
        section, name = key.split(".", 1)
        config[section][name] = yaml.safe_load(value)
    model = config["model"]
    if variant == "direct":
        model.pop("init_from")
        model["stage1"] = str(demo / "exports" / "stage1")
    if variant in ("direct", "transfer"):
        model["projection_warmup_steps"] = 0
        model.pop("projection_lr_scale", None)  # a warm-up setting: refused without a warm-up
    if variant == "lstsq":
        model["init_projection"] = "lstsq"
    config["trainer"]["default_root_dir"] = str(out / variant)
    return config


class AttributeProbe(pl.Callback):
    """Every `every` steps: caption the probe images with the model being trained, and note the training seconds."""

    def __init__(self, demo: str, every: int, images: int, record: str):
        self.demo, self.every, self.images, self.record = Path(demo), every, images, Path(record)
        self.train_seconds, self.clock, self.rows = 0.0, None, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.clock = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.train_seconds += time.perf_counter() - self.clock
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            self.rows.append({"step": step, "train_seconds": round(self.train_seconds, 1),
                              "attribute_accuracy": self.accuracy(module)})
            self.record.write_text(json.dumps(self.rows, indent=1) + "\n")

    def accuracy(self, module) -> float:
        from qformer.generation import CAPTION_GENERATION, CAPTION_PROMPT
        from stages.apps.generate import generate_for_images
        from stages.data.feature_cache import image_source
        from stages.demo.pipeline import attribute_accuracy

        entries = json.loads((self.demo / "data" / "test.json").read_text())[: self.images]
        images = [e["image"] for e in entries]
        reader = image_source(None, str(self.demo / "features" / "eval"), module.model.visual_encoder, images,
                              str(self.demo / "data" / "test.json"))
        settings = dataclasses.replace(CAPTION_GENERATION, num_beams=1, max_new_tokens=20, min_new_tokens=3)
        was_training = module.model.training
        module.model.eval()
        # No autocast, as `qformer eval caption` runs (and torch.stack of the cache's fp16 features fails under a CPU
        # bf16 autocast: "Unexpected floating ScalarType in at::autocast::prioritize").
        with torch.no_grad():
            captions = generate_for_images(module.model, module.lm_tokenizer, images, [[CAPTION_PROMPT]] * len(images),
                                           reader, settings, batch_size=50)
        module.model.train(was_training)
        predictions = {str(e["image_id"]): c[0] for e, c in zip(entries, captions)}
        return round(100 * attribute_accuracy(predictions, entries), 1)


def run_variant(demo: Path, variant: str, out: Path, every: int, images: int, overrides: list[str]) -> list[dict]:
    from stages.demo.pipeline import last_logged
    from stages.train.lightning_cli import run_training

    config = variant_config(demo, variant, out, overrides)
    record = out / f"{variant}.json"
    config["trainer"]["callbacks"] = [{"class_path": "transfer.AttributeProbe", "init_args": {
        "demo": str(demo), "every": every, "images": images, "record": str(record)}}]
    run_training("stage2", {"subcommand": "fit", "fit": copy.deepcopy(config)})
    rows = json.loads(record.read_text())
    rows[-1]["val_loss"] = last_logged(out / variant, "val/loss_lm")
    return rows


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"  # None: the fit ended before its first validation


def first_at(rows: list[dict], target: float) -> str:
    return next((f"{r['train_seconds']:.0f} (step {r['step']})" for r in rows if r["attribute_accuracy"] >= target), "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="the --out folder of a finished `qformer demo --lm smollm2`")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change the demo's stage-2 config for every variant, e.g. --set data.batch_size=16")
    parser.add_argument("--out", default=None, help="where the runs go (default DEMO/bench_transfer)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = Path(args.demo).resolve()
    out = Path(args.out).resolve() if args.out else demo / "bench_transfer"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in args.variants.split(","):
        results[variant] = run_variant(demo, variant, out, args.eval_every, args.eval_images, args.set)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    steps = [row["step"] for row in next(iter(results.values()))]
    header = ["variant", *[f"acc @{s}" for s in steps], "val loss", "s to 40 %", "s to 60 %", "train s"]
    table = [[v, *[f"{r['attribute_accuracy']:.1f}" for r in rows], _loss(rows[-1]["val_loss"]),
              first_at(rows, 40), first_at(rows, 60), f"{rows[-1]['train_seconds']:.0f}"] for v, rows in results.items()]
    print_table(header, table)


if __name__ == "__main__":
    main()
