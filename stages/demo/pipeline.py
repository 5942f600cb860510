"""`qformer demo`: stage 1, stage 2 and evaluation end to end on built-in synthetic data, on a CPU.

Every step calls the function a user's command runs (`make-data`, `stage1 fit`, `export`, `stage2 fit`,
`export`, the evaluations, `caption`, `ask`): the same LightningModules, data modules, config files (written
to `OUT/configs` for the user to reuse), export folders and evaluation functions. The only step a real run
does not have is the stand-in LLM (`stages.demo.language_model`). The frozen image encoder is a randomly
initialised timm ViT (no pretrained vision weights can be had offline): the Q-Former learns to read what its
random features preserve.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from qformer.files import check_gguf
from qformer.generation import CAPTION_GENERATION, CAPTION_PROMPT, VQA_GENERATION, vqa_prompt
from stages.demo.figures import plot_losses, plot_samples
from stages.demo.language_model import pretrain_language_model
from stages.demo.settings import (
    CROP_SCALE,
    ENCODER,
    HFLIP,
    SMOLLM2,
    DemoSettings,
    cpu_has_fast_bf16,
    feature_caches,
    lm_config,
    model_config,
    smollm2_gguf,
    write_configs,
    write_encoder_weights,
)

# Training views cached per training image. With the demo's transform (crop_scale [1, 1], no flip) every
# RandomResizedCrop draw is the whole image resized, pixel for pixel the eval view (checked in the tests), so one
# view (the eval view) is all training would ever see; a dataset trained with crops and flips would take 4 to 8.
TRAIN_VIEWS = 1


def attribute_accuracy(predictions: dict[str, str], entries: list[dict]) -> float:
    """Fraction of images whose caption names every object's colour and shape (as "colour shape")."""
    hits = 0
    for entry in entries:
        caption = predictions.get(str(entry["image_id"]), "")
        hits += all(f"{o['color']} {o['shape']}" in caption for o in entry["objects"])
    return hits / len(entries)


def _step(title: str) -> None:
    print(f"\n== {title}", file=sys.stderr)


def _train(stage: str, config: Path) -> Path:
    """`qformer STAGE fit --config CONFIG`, called as a function; returns the run's last checkpoint."""
    from stages.train.checkpoints import last_checkpoint
    from stages.train.lightning_cli import run_training
    from stages.train.resume import StoppedBySignal

    _step(f"{stage} fit ({config})")
    try:
        cli = run_training(stage, {"subcommand": "fit", "fit": yaml.safe_load(config.read_text())})
    except StoppedBySignal as stop:  # the checkpoint is saved; the rest of the demo must not run on a half-trained model
        _say_how_to_resume(stage, config)
        stop.told = True
        raise
    stopped_by = cli.stopped_by_signal()
    if stopped_by is not None:  # the signal came after the last step: the fit's checkpoints are whole, the demo stops
        _say_how_to_resume(stage, config)
        stop = SystemExit(128 + stopped_by)
        stop.told = True
        raise stop
    return Path(last_checkpoint(cli.trainer))


def _say_how_to_resume(stage: str, config: Path) -> None:
    """The command that continues the stopped stage (the config's paths are relative to the demo's directory); the
    steps after it are the demo's own, which reruns them all."""
    print(f"qformer demo: stopped during the {stage} fit; resume that stage with: cd {Path.cwd()} && "
          f"qformer {stage} fit --config {config.resolve()} --ckpt_path last (or rerun qformer demo to start over)",
          file=sys.stderr)


def _cache_features(settings: DemoSettings, data: Path, model_config_file: Path, out: Path) -> None:
    """`qformer cache-features`: the frozen encoder runs once per image (and view) for all of training and evaluation."""
    from stages.tools.cache_features import cache_features

    caches = feature_caches(out)
    common = dict(config=str(model_config_file), images=str(data), seed=settings.seed, hflip=HFLIP, crop_scale=CROP_SCALE,
                  overwrite=True)  # the demo owns its --out folder: a cache of other settings is replaced
    _step(f"cache-features (train: eval view{f' + {TRAIN_VIEWS} training views' if TRAIN_VIEWS > 1 else ''}; val + test: eval view)")
    cache_features(data=[str(data / "train.json")], out=str(caches["train"]), views=TRAIN_VIEWS, **common)
    cache_features(data=[str(data / "val.json"), str(data / "test.json")], out=str(caches["eval"]), views=1, **common)


def _evaluate(settings: DemoSettings, data: Path, exports: Path, out: Path, phase, stage2, lm_tokenizer) -> tuple[dict, dict, dict, dict[str, str]]:
    """Retrieval, captioning and zero-shot VQA on the test split, as `qformer eval retrieval|caption|vqa --features` compute them."""
    from qformer.folders import load_stage1
    from stages.data.feature_cache import image_source
    from stages.eval.caption import evaluate_captions
    from stages.eval.common import EvalSet
    from stages.eval.retrieval import evaluate_retrieval
    from stages.eval.vqa import evaluate_vqa, load_questions

    features = str(feature_caches(out)["eval"])
    _step("eval retrieval (ITC top-16 + ITM re-rank)")
    stage1, tokenizer = load_stage1(exports / "stage1")
    test = EvalSet.load(str(data / "test.json"), None, features=features, encoder=stage1.visual_encoder)
    retrieval, _, _ = evaluate_retrieval(stage1, tokenizer, test, k_test=16)
    phase("eval_retrieval")
    _step("eval caption")
    generation = dataclasses.replace(CAPTION_GENERATION, num_beams=settings.num_beams, max_new_tokens=20, min_new_tokens=3)
    test = EvalSet.load(str(data / "test.json"), None, features=features, encoder=stage2.visual_encoder)
    caption, predictions, notices = evaluate_captions(stage2, lm_tokenizer, test, CAPTION_PROMPT, 64, generation)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    phase("eval_caption")
    _step("eval vqa (zero-shot)")
    questions = load_questions(str(data / "test_vqa.json"))
    reader = image_source(None, features, stage2.visual_encoder, [q.image for q in questions], str(data / "test_vqa.json"))
    vqa, answers = evaluate_vqa(stage2, lm_tokenizer, questions, reader, vqa_prompt(stage2, lm_tokenizer), 64,
                                dataclasses.replace(VQA_GENERATION, num_beams=settings.num_beams))
    phase("eval_vqa")
    for name, value in (("retrieval", retrieval), ("caption", caption), ("vqa", vqa), ("vqa_predictions", answers),
                        ("predictions", [{"image_id": k, "caption": v} for k, v in predictions.items()])):
        (out / f"{name}.json").write_text(json.dumps(value, indent=2) + "\n")
    return retrieval, caption, vqa, predictions


def _examples(settings: DemoSettings, data: Path, model, tokenizer, entries: list[dict]) -> list[dict]:
    """Four test images, captioned and asked about as `qformer caption` and `qformer ask` do it."""
    from stages.apps.generate import generate_for_images
    from stages.data.images import ImageReader

    _step("caption and ask")
    questions = json.loads((data / "test_vqa.json").read_text())[:4]
    images = [str(data / e["image"]) for e in entries[:4]]
    captions = generate_for_images(model, tokenizer, images, [[CAPTION_PROMPT]] * len(images), ImageReader(),
                                   dataclasses.replace(CAPTION_GENERATION, num_beams=settings.num_beams, min_new_tokens=3))
    examples = []
    for image, caption, entry, question in zip(images, captions, entries, questions):
        [answer] = generate_for_images(model, tokenizer, [image], [[vqa_prompt(model, tokenizer).format(question["question"])]], ImageReader(),
                                       VQA_GENERATION, batch_size=1)
        examples.append({"image": image, "caption": caption[0], "reference": entry["caption"][0],
                         "question": question["question"], "answer": answer[0], "expected": question["answer"][0]})
    return examples


def run_demo(settings: DemoSettings) -> dict:
    from qformer.bert import load_tokenizer
    from qformer.folders import load_stage2
    from stages.data.synthetic import make_data
    from stages.tools.export import export

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    data, exports = out / "data", out / "exports"
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    start = clock
    # A real LLM is looked for first: a missing package or file fails in one line before any work, not after stage 1.
    target_lm = check_gguf(smollm2_gguf()) if settings.pretrained_lm else None
    _step("make-data")
    make_data(str(data), num_images=settings.num_images, seed=settings.seed, image_size=64, val_images=settings.val_images,
              test_images=settings.test_images)
    phase("data")

    # The stand-in learns the captions' language here; a real LLM is used as it is, and reached by transfer from the
    # stand-in's stage 2.
    lm_path = pretrain_language_model(settings, data, out, slots=model_config(settings, 0)["num_query_tokens"])
    phase("lm_pretraining")

    vocab_size = len(load_tokenizer(data))
    configs = write_configs(settings, out, data, vocab_size, lm_path, write_encoder_weights(settings, out), target_lm)
    _cache_features(settings, data, configs["model"], out)
    phase("cache_features")
    # overwrite: the demo owns its --out folder, so a second run replaces its own exports
    export(str(_train("stage1", configs["stage1"])), out=str(exports / "stage1"), overwrite=True)
    phase("stage1")
    if target_lm is not None:
        export(str(_train("stage2", configs["stage2_source"])), out=str(exports / "stage2_source"), overwrite=True)
        phase("stage2_source")
    export(str(_train("stage2", configs["stage2"])), out=str(exports / "stage2"), overwrite=True)
    phase("stage2")

    # The stage-2 export is loaded once for the evaluation and the examples (SmolLM2's GGUF takes seconds to dequantise).
    stage2, lm_tokenizer = load_stage2(exports / "stage2")
    if target_lm is not None and cpu_has_fast_bf16():
        # SmolLM2 generates in bf16, as its stage 2 trained (bf16-mixed): 1.6x faster than in fp32 on such a CPU
        # (64 test images, beam 3: 12.3 s vs 20.1 s; 52 of the 64 captions identical, attribute accuracy 84.4 vs 85.9 %).
        stage2.language_model.set_precision("bf16")
    retrieval, caption, vqa, predictions = _evaluate(settings, data, exports, out, phase, stage2, lm_tokenizer)
    entries = json.loads((data / "test.json").read_text())
    caption["attribute_accuracy"] = 100 * attribute_accuracy(predictions, entries)
    examples = _examples(settings, data, stage2, lm_tokenizer, entries)
    phase("examples")

    plot_samples(out, data, entries, predictions)
    plot_losses(out, lm_path)
    phase("figures")
    seconds["total"] = round(time.perf_counter() - start, 1)

    results = {
        "retrieval": retrieval,
        "caption": caption,
        "vqa": vqa,
        "seconds": seconds,
        "encoder": ENCODER,
        "lm": describe_lm(settings, vocab_size),
        "lm_eval_precision": stage2.language_model.weight_precision,
        "data": {split: len(json.loads((data / f'{split}.json').read_text())) for split in ("val", "test")} | {"train_captions": len(json.loads((data / 'train.json').read_text()))},
        "chance_r1": 100 / len(entries),
        "examples": examples,
        "settings": asdict(settings),
    }
    if settings.pretrained_lm:
        results["stage2_fits"] = stage2_fits(out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results, out)
    return results


def stage2_fits(out: Path) -> list[dict]:
    """The transfer route's two stage-2 fits (the stand-in's, then SmolLM2's): LM, steps and last validation loss."""
    rows = []
    for name, lm in (("stage2_source", "stand-in OPT (transfer source)"), ("stage2", "SmolLM2 (transferred, projection warm-up)")):
        config = yaml.safe_load((out / "configs" / f"{name}.yaml").read_text())
        rows.append({"name": name, "lm": lm, "steps": config["trainer"]["max_steps"], "batch_size": config["data"]["batch_size"],
                     "projection_warmup_steps": config["model"].get("projection_warmup_steps", 0),
                     "val_loss": last_logged(Path(config["trainer"]["default_root_dir"]), "val/loss_lm")})
    return rows


def last_logged(run_root: Path, metric: str) -> float | None:
    """The last value of `metric` in the newest metrics.csv under a run's folder."""
    import csv

    files = sorted(run_root.rglob("metrics.csv"), key=lambda f: f.stat().st_mtime)
    if not files:
        return None
    with open(files[-1]) as f:
        values = [row[metric] for row in csv.DictReader(f) if row.get(metric)]
    return float(values[-1]) if values else None


def describe_lm(settings: DemoSettings, vocab_size: int) -> str:
    if settings.pretrained_lm:
        return (f"{SMOLLM2}, pretrained elsewhere and frozen; its stage 2 starts from the Q-Former of a stage 2 against a "
                f"stand-in OPT ({lm_config(settings, vocab_size)}) pre-trained here for {settings.lm_steps} steps")
    return (f"{'T5' if settings.encoder_decoder else 'OPT'} architecture ({lm_config(settings, vocab_size)}), pre-trained here for "
            f"{settings.lm_steps} steps on the training captions' text (and questions with answers) after a context of one embedding "
            "per object, then frozen")


def print_summary(results: dict, out: Path) -> None:
    r, c = results["retrieval"], results["caption"]
    print()
    print(f"qformer demo — held-out test split: {r['images']} images, {r['texts']} captions (chance R@1 {results['chance_r1']:.1f}%)")
    print(f"  image encoder: {results['encoder']}")
    how = "pretrained elsewhere, frozen as it is" if DemoSettings(**results["settings"]).pretrained_lm else "pre-trained here on caption text, then frozen"
    print(f"  language model: {results['lm'].split(' (')[0]}, {how}")
    for fit in results.get("stage2_fits", []):  # the transfer route: what each stage 2 was
        loss = "n/a" if fit["val_loss"] is None else f"{fit['val_loss']:.3f}"
        warmup = f", the first {fit['projection_warmup_steps']} the projection alone" if fit["projection_warmup_steps"] else ""
        print(f"  {fit['name']}: {fit['lm']}, {fit['steps']} steps of batch {fit['batch_size']}{warmup}, "
              f"{results['seconds'].get(fit['name'], 0)} s, val loss {loss}")
    rows = [
        ("text retrieval R@1 / R@5 / R@10", f"{r['txt_r1']:.1f} / {r['txt_r5']:.1f} / {r['txt_r10']:.1f}"),
        ("image retrieval R@1 / R@5 / R@10", f"{r['img_r1']:.1f} / {r['img_r5']:.1f} / {r['img_r10']:.1f}"),
        ("caption BLEU-4 / CIDEr", f"{c['bleu4']:.1f} / {c['cider']:.1f}"),
        ("caption attribute accuracy", f"{c['attribute_accuracy']:.1f} %"),
        ("zero-shot VQA accuracy", f"{results['vqa']['accuracy']:.1f} % ({results['vqa']['questions']} questions)"),
        ("time (s)", ", ".join(f"{k} {v}" for k, v in results["seconds"].items())),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("  examples:")
    for e in results["examples"]:
        print(f"    {Path(e['image']).name}: caption {e['caption']!r} (reference {e['reference']!r}); "
              f"{e['question']!r} -> {e['answer']!r} (expected {e['expected']!r})")
    print(f"  everything is in {out}/ (results.json, samples.png, losses.png, configs/, features/, runs/, exports/)")
