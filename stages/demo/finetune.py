"""`qformer demo-finetune`: a finished demo's stage-1 export fine-tuned for retrieval with its image encoder trained,
against the frozen-encoder continuation of the same export at the same step budget; then its stage-2 export likewise
for captioning.

The demo's encoder is a randomly initialised ViT: a linear probe of its patch tokens names the first object's shape
about 67 % of the time, of the query outputs about 52-60 % (colour 99 %). Training the encoder is the way past that,
given the steps: at the default 750 (about 4 minutes a run on 2 cores) the trained run leads the frozen one by 8-10
points of text R@1 and 10 of shape probe, at 300 the two tied (docs/finetuning.md#on-the-demos-data).

Both runs of a pair continue from the same export with the same data (images, read as the demo's training view: no
feature cache in either), steps, learning rate and seed; they differ only in `model.train_vision` (and the
encoder's own lr, `vision_lr_scale`). Measured on the test split: retrieval R@1 both ways (ITC top-16 re-ranked by
ITM, as the demo evaluates) and the shape probe; the captions' attribute accuracy (as `qformer demo` scores it).

The encoder's default lr is 0.3 x the Q-Former's: probed at 150 steps, scales of 3 to 30 dropped text R@1 to ~50
(the Q-Former, trained on the random features, loses what it read), 0.03 to 1 stayed within noise of the frozen run
(docs/finetuning.md#on-the-demos-data).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import yaml

from stages.demo.pipeline import _train
from stages.demo.settings import DemoSettings

PROBE_TRAIN_IMAGES = 2000  # training images the probe is fitted on (the test split is what it is scored on)


def finetune_config(out: Path, name: str, train_vision: bool, steps: int, lr: float, vision_lr_decay: float,
                    batch_size: int, seed: int, vision_lr_scale: float = 1.0) -> Path:
    """The stage-1 fine-tune's config file, written to OUT/configs/finetune_NAME.yaml for the user to reuse."""
    model = {"init_from": str(out / "exports" / "stage1"), **_schedule(lr, steps), "val_retrieval": "off",
             "train_vision": train_vision}
    if train_vision:
        model.update(vision_lr_decay=vision_lr_decay, vision_lr_scale=vision_lr_scale)
    config = {
        "seed_everything": seed,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32", "max_steps": steps, "log_every_n_steps": 25,
                    "gradient_clip_val": 1.0, "enable_model_summary": False, "num_sanity_val_steps": 0, "deterministic": True,
                    "default_root_dir": str(out / "runs" / f"finetune_{name}")},
        "model": model,
        "data": _image_data(out, batch_size),
    }
    return _write_config(out, f"finetune_{name}", config)


def _schedule(lr: float, steps: int) -> dict:
    """Both fine-tunes' optimiser settings: warmup a tenth of the steps, cosine to lr / 10."""
    return {"lr": lr, "min_lr": lr / 10, "weight_decay": 0.05, "warmup_steps": max(1, steps // 10)}


def _image_data(out: Path, batch_size: int) -> dict:
    """Both fine-tunes' data: the demo's training images read (no feature cache, so that an encoder can train), in
    the demo's training view (no flip or crop: captions name left and right)."""
    data = out / "data"
    return {"train": str(data / "train.json"), "image_root": str(data), "image_size": _image_size(out),
            "batch_size": batch_size, "num_workers": 0, "hflip": False, "crop_scale": [1.0, 1.0]}


def _write_config(out: Path, name: str, config: dict) -> Path:
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def caption_config(out: Path, name: str, train_vision: bool, steps: int, lr: float, vision_lr_scale: float,
                   batch_size: int, seed: int) -> Path:
    """The caption fine-tune of the demo's stage-2 export (same LM, its projection kept), written to
    OUT/configs/caption_NAME.yaml: the demo's own stage-2 config with its start, schedule and data replaced (images
    read, not the feature cache, so that both runs see the same inputs)."""
    demo = yaml.safe_load((out / "configs" / "stage2.yaml").read_text())
    lm_keys = ("lm_path", "lm_gguf_file", "lm_config", "lm_tokenizer", "lm_precision", "prompt", "eos_text", "max_text_length")
    model = {k: v for k, v in demo["model"].items() if k in lm_keys}
    model.update(init_from=str(out / "exports" / "stage2"), init_projection="keep", **_schedule(lr, steps),
                 train_vision=train_vision)
    if train_vision:
        model["vision_lr_scale"] = vision_lr_scale
    trainer = {k: v for k, v in demo["trainer"].items() if k not in ("val_check_interval", "check_val_every_n_epoch")}
    trainer.update(max_steps=steps, default_root_dir=str(out / "runs" / f"caption_{name}"))
    config = {"seed_everything": seed, "trainer": trainer, "model": model, "data": _image_data(out, batch_size)}
    return _write_config(out, f"caption_{name}", config)


def _image_size(out: Path) -> int:
    from qformer.folders import read_config

    return read_config(out / "exports" / "stage1").vision_config.image_size


@torch.no_grad()
def query_outputs(model, data: Path, entries: list[dict], batch_size: int = 100) -> torch.Tensor:
    """The Q-Former's query outputs (N, Q * D) of each entry's image, read as the evaluation reads it."""
    from qformer.transforms import eval_transform
    from stages.data.images import read_rgb

    transform = eval_transform(model.config.vision_config.image_size)
    rows = []
    for start in range(0, len(entries), batch_size):
        pixels = torch.stack([transform(read_rgb(data / e["image"])) for e in entries[start : start + batch_size]])
        rows.append(model.query_forward(model.encode_image(pixels)).last_hidden_state.flatten(1))
    return torch.cat(rows)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          l2: float = 1e-3, iterations: int = 200) -> float:
    """Test accuracy (%) of a multinomial logistic regression fitted (L-BFGS, L2) on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return 100.0 * (linear(test_x).argmax(1) == test_y).float().mean().item()


def shape_probe(model, data: Path, train: list[dict], test: list[dict]) -> float:
    """How well the query outputs tell the first object's shape: a linear probe's test accuracy (%)."""
    shapes = sorted({e["objects"][0]["shape"] for e in train + test})
    label = lambda entries: torch.tensor([shapes.index(e["objects"][0]["shape"]) for e in entries])  # noqa: E731
    return linear_probe_accuracy(query_outputs(model, data, train), label(train), query_outputs(model, data, test), label(test))


def measure(folder: Path, data: Path, probe_train: list[dict], test: list[dict]) -> dict:
    """Test retrieval R@1 both ways and the shape probe of one stage-1 export."""
    from qformer.folders import load_stage1
    from stages.eval.common import EvalSet
    from stages.eval.retrieval import evaluate_retrieval

    model, tokenizer = load_stage1(folder)
    recalls, _, _ = evaluate_retrieval(model, tokenizer, EvalSet.load(str(data / "test.json"), str(data)), k_test=16,
                                       show_progress=False)
    return {"txt_r1": recalls["txt_r1"], "img_r1": recalls["img_r1"], "shape_probe": shape_probe(model, data, probe_train, test)}


def caption_attribute_accuracy(folder: Path, data: Path, test: list[dict]) -> float:
    """% of test images whose generated caption names every object's colour and shape, as `qformer demo` scores it."""
    import dataclasses

    from qformer.folders import load_stage2
    from qformer.generation import CAPTION_GENERATION, CAPTION_PROMPT
    from stages.demo.pipeline import attribute_accuracy
    from stages.eval.caption import generate_captions
    from stages.eval.common import EvalSet

    model, tokenizer = load_stage2(folder)
    generation = dataclasses.replace(CAPTION_GENERATION, num_beams=DemoSettings.num_beams, max_new_tokens=20, min_new_tokens=3)
    captions = generate_captions(model, tokenizer, EvalSet.load(str(data / "test.json"), str(data)), CAPTION_PROMPT, 64,
                                 generation, show_progress=False)
    return 100 * attribute_accuracy(captions, test)


def distinct_images(entries: list[dict]) -> list[dict]:
    seen, kept = set(), []
    for entry in entries:
        if entry["image"] not in seen:
            seen.add(entry["image"])
            kept.append(entry)
    return kept


def demo_finetune(out: str = "demo_out", *, steps: int = 750, lr: float = 1e-3, vision_lr_decay: float = 1.0,
                  vision_lr_scale: float = 0.3, batch_size: int = 48, caption_steps: int = 750, caption_lr: float = 1e-3,
                  seed: int = 0) -> int:
    """Fine-tune a finished demo's stage-1 export for retrieval with the image encoder trained, and compare it with
    the frozen-encoder continuation at the same step budget (test R@1 both ways, and the shape probe); then likewise
    its stage-2 export for captioning (the test captions' attribute accuracy).

    Args:
        out: the folder of a finished `qformer demo` (its data/ and exports/ are used; configs, runs and exports of
            the fine-tunes are added, and the figures written to finetune.json).
        steps: optimizer steps of each retrieval fine-tune.
        lr: peak learning rate of both (warmup a tenth of the steps, cosine to lr / 10).
        vision_lr_decay: layer-wise lr decay on the trained encoder.
        vision_lr_scale: the trained encoder's lrs (after the decay) times this.
        batch_size: training batch size (both fine-tunes).
        caption_steps: optimizer steps of each caption fine-tune (0: no caption fine-tune).
        caption_lr: their peak learning rate.
        seed: the random seed of every run.
    """
    out = Path(out)
    data = out / "data"
    for stage in ("stage1", "stage2"):
        if not (out / "exports" / stage / "qformer_export.json").is_file():
            raise FileNotFoundError(f"{out}/exports/{stage}: no {stage} export; run qformer demo --out {out} first")
    test = json.loads((data / "test.json").read_text())
    probe_train = distinct_images(json.loads((data / "train.json").read_text()))[:PROBE_TRAIN_IMAGES]
    results = {"steps": steps, "before": measure(out / "exports" / "stage1", data, probe_train, test)}
    for name, train_vision in (("frozen", False), ("trained", True)):
        config = finetune_config(out, name, train_vision, steps, lr, vision_lr_decay, batch_size, seed, vision_lr_scale)
        folder, seconds = _fit_and_export("stage1", config, out / "exports" / f"finetune_{name}")
        results[name] = {**measure(folder, data, probe_train, test), **seconds}
    if caption_steps:
        results["caption"] = caption_finetunes(out, test, caption_steps, caption_lr, vision_lr_scale, batch_size, seed)
    (out / "finetune.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def _fit_and_export(stage: str, config: Path, folder: Path) -> tuple[Path, dict]:
    """(export folder, the fit's wall and CPU seconds without the export: on a shared machine the wall time also
    counts the others' work)."""
    from stages.tools.export import export

    started, started_cpu = time.perf_counter(), time.process_time()
    checkpoint = _train(stage, config)
    seconds = {"train_seconds": time.perf_counter() - started, "train_cpu_seconds": time.process_time() - started_cpu}
    export(str(checkpoint), out=str(folder), overwrite=True)
    return folder, seconds


def caption_finetunes(out: Path, test: list[dict], steps: int, lr: float, vision_lr_scale: float, batch_size: int,
                      seed: int) -> dict:
    """The stage-2 export's attribute accuracy before, and after `steps` caption steps with the encoder frozen and trained."""
    data = out / "data"
    results = {"steps": steps, "before": {"attribute_accuracy": caption_attribute_accuracy(out / "exports" / "stage2", data, test)}}
    for name, train_vision in (("frozen", False), ("trained", True)):
        config = caption_config(out, name, train_vision, steps, lr, vision_lr_scale, batch_size, seed)
        folder, seconds = _fit_and_export("stage2", config, out / "exports" / f"caption_{name}")
        results[name] = {"attribute_accuracy": caption_attribute_accuracy(folder, data, test), **seconds}
    return results


TITLES = (("before", "demo's export"), ("frozen", "+ encoder frozen"), ("trained", "+ encoder trained"))


def print_table(results: dict) -> None:
    print(f"\nretrieval fine-tune of the stage-1 export, {results['steps']} steps each (test split)", file=sys.stderr)
    print(f"{'':20} {'text R@1':>9} {'image R@1':>10} {'shape probe':>12}   {'training, wall (cpu)'}")
    for name, title in TITLES:
        r = results[name]
        print(f"{title:20} {r['txt_r1']:9.1f} {r['img_r1']:10.1f} {r['shape_probe']:11.1f}%  {_seconds(r)}")
    caption = results.get("caption")
    if caption:
        print(f"\ncaption fine-tune of the stage-2 export, {caption['steps']} steps each (test split)", file=sys.stderr)
        print(f"{'':20} {'attribute accuracy':>19}   {'training, wall (cpu)'}")
        for name, title in TITLES:
            print(f"{title:20} {caption[name]['attribute_accuracy']:18.1f}%  {_seconds(caption[name])}")


def _seconds(result: dict) -> str:
    """Training wall seconds (and CPU seconds, when recorded)."""
    if "train_seconds" not in result:
        return ""
    cpu = f" ({result['train_cpu_seconds']:.0f} cpu)" if "train_cpu_seconds" in result else ""
    return f"{result['train_seconds']:.0f} s{cpu}"
