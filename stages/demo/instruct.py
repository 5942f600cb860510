"""`qformer demo --instruct`: instruction tuning (InstructBLIP) on the synthetic scenes, and the paper's ablation.

The scenes gain four question tasks besides captions (`stages.data.synthetic_tasks`: colour, shape, how many, what is
on the left/right). As InstructBLIP starts from a finished BLIP-2, a captions-only stage 2 (the default demo's) comes
first; from it, stage 2 trains on the task mixture (files drawn with p ~ sqrt(size), one training template drawn per
sample) twice at the same step budget: with the instruction-aware Q-Former (`qformer_text_input`) and with the plain
one, which gives the LM the same instructions but reads the image alone. Both are then evaluated per task on the
test split with held-out templates, phrasings stage 2 never trained on, and again with the training templates (the
held-in phrasings: the difference is the template gap). The rest (data, the frozen encoder, the feature caches,
stage 1) is the default demo's. The stand-in LM's text pre-training reads every phrasing, held-out ones too: they stand
for the language a real LLM knows from its own pre-training (`stages.demo.language_model.LANGUAGE_TEMPLATES`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from qformer.generation import CAPTION_GENERATION, VQA_GENERATION
from stages.data.synthetic_tasks import HELDOUT_TEMPLATES, QUESTION_TASKS, TEMPLATES
from stages.demo.settings import DemoSettings, feature_caches

FITS = {"instruction-aware": "stage2", "plain": "stage2_plain"}  # the ablation's two stage-2 fits and their folders
CAPTIONS_FIT = "stage2_captions"  # the default demo's captions-only stage 2, where both fits start (a finished BLIP-2)
TASKS = ("caption",) + QUESTION_TASKS
MAX_TEXT_LENGTH = 40  # LM tokens: the longest training template with a question and its answer, or a caption
# Each instruction-tuning fit's steps, as a share of the captions stage's (--stage2-steps, default 1,000): 850 steps
# of each fit after 1,000 captions-only ones keep the demo within 12 minutes on 2 cores.
INSTRUCT_STEP_SHARE = 0.85


def instruct_steps(settings: DemoSettings) -> int:
    return max(1, round(INSTRUCT_STEP_SHARE * settings.stage2_step_count))


def instruct_configs(settings: DemoSettings, configs: dict[str, Path], out: Path, data: Path) -> dict[str, Path]:
    """The captions-only stage 2 (`stage2_captions`, the default demo's, validated once at the end), and the two
    configs of the ablation starting from its export: the task mixture with templates, and the switch on (`stage2`)
    or off (`stage2_plain`); the instruction-aware Q-Former's text weights, which a plain export lacks, come from
    stage 1."""
    captions = yaml.safe_load(configs["stage2"].read_text())
    captions["trainer"].update(default_root_dir=str(out / "runs" / CAPTIONS_FIT), val_check_interval=captions["trainer"]["max_steps"])
    paths = {CAPTIONS_FIT: configs["stage2"].with_name(f"{CAPTIONS_FIT}.yaml")}
    paths[CAPTIONS_FIT].write_text(yaml.safe_dump(captions, sort_keys=False))
    base = json.loads(json.dumps(captions))
    base["data"]["train"] = [str(data / "train.json")] + [str(data / f"train_{task}.json") for task in QUESTION_TASKS]
    base["data"]["templates"] = str(data / "templates.yaml")
    base["model"].update(prompt="", max_text_length=MAX_TEXT_LENGTH, init_from=str(out / "exports" / CAPTIONS_FIT),
                         init_projection="keep")
    steps = instruct_steps(settings)
    base["trainer"].update(max_steps=steps, val_check_interval=steps)  # validated once, at the end
    for name, folder in FITS.items():
        fit = json.loads(json.dumps(base))
        fit["model"]["qformer_text_input"] = name == "instruction-aware"
        if name == "plain":
            del fit["model"]["stage1"]  # everything from the captions stage's export
        fit["trainer"]["default_root_dir"] = str(out / "runs" / folder)
        paths[folder] = configs["stage2"].with_name(f"{folder}.yaml")
        paths[folder].write_text(yaml.safe_dump(fit, sort_keys=False))
    return paths


def evaluate_tasks(settings: DemoSettings, data: Path, export: Path, out: Path,
                   templates: dict[str, list[str]] = HELDOUT_TEMPLATES) -> dict[str, dict]:
    """Per task, accuracy (%) on the test split with `templates` (the held-out ones, or the training ones), each
    question or image getting one of them in turn: captions score when they name every object's colour and shape;
    answers by VQA accuracy."""
    from qformer.folders import load_stage2
    from stages.apps.generate import generate_for_images
    from stages.data.feature_cache import image_source
    from stages.data.questions import load_questions
    from stages.demo.pipeline import attribute_accuracy
    from stages.eval.vqa import evaluate_vqa

    model, tokenizer = load_stage2(export)
    features = str(feature_caches(out)["eval"])
    captions = [t.replace("<Image>", "").strip() for t in templates["caption"]]
    entries = json.loads((data / "test.json").read_text())
    reader = image_source(None, features, model.visual_encoder, [e["image"] for e in entries], str(data / "test.json"))
    generation = dataclasses.replace(CAPTION_GENERATION, num_beams=settings.num_beams, max_new_tokens=20, min_new_tokens=3)
    texts = generate_for_images(model, tokenizer, [e["image"] for e in entries],
                                [[captions[i % len(captions)]] for i in range(len(entries))], reader, generation, 64)
    predictions = {str(e["image_id"]): t[0] for e, t in zip(entries, texts) if t is not None}
    results = {"caption": {"accuracy": 100 * attribute_accuracy(predictions, entries), "items": len(entries)}}
    answers = dataclasses.replace(VQA_GENERATION, num_beams=settings.num_beams)
    questions_asked = [t.replace("<Image>", "").strip() for t in templates["vqa"]]
    for task in QUESTION_TASKS:
        questions = load_questions(str(data / f"test_{task}.json"))
        hits = 0.0
        for i, template in enumerate(questions_asked):
            part = questions[i :: len(questions_asked)]
            scores, _ = evaluate_vqa(model, tokenizer, part, reader, template, 64, answers, show_progress=False)
            hits += scores["accuracy"] * scores["questions"]
        results[task] = {"accuracy": hits / len(questions), "items": len(questions)}
    return results


def run_instruct_demo(settings: DemoSettings) -> dict:
    from qformer.bert import load_tokenizer
    from stages.data.synthetic import make_data
    from stages.demo.language_model import pretrain_language_model
    from stages.demo.pipeline import _cache_features, _step, _train
    from stages.demo.settings import ENCODER, model_config, write_configs, write_encoder_weights
    from stages.tools.export import export

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    data, exports = out / "data", out / "exports"
    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    _step("make-data --instruct")
    make_data(str(data), num_images=settings.num_images, seed=settings.seed, image_size=64, val_images=settings.val_images,
              test_images=settings.test_images, instruct=True)
    phase("data")
    lm_path = pretrain_language_model(settings, data, out, slots=model_config(settings, 0)["num_query_tokens"])
    phase("lm_pretraining")
    vocab_size = len(load_tokenizer(data))
    configs = write_configs(settings, out, data, vocab_size, lm_path, write_encoder_weights(settings, out))
    configs.update(instruct_configs(settings, configs, out, data))
    _cache_features(settings, data, configs["model"], out)
    phase("cache_features")
    export(str(_train("stage1", configs["stage1"])), out=str(exports / "stage1"), overwrite=True)
    phase("stage1")
    export(str(_train("stage2", configs[CAPTIONS_FIT])), out=str(exports / CAPTIONS_FIT), overwrite=True)
    phase(CAPTIONS_FIT)
    tasks, held_in = {}, {}
    for name, folder in FITS.items():
        export(str(_train("stage2", configs[folder])), out=str(exports / folder), overwrite=True)
        phase(folder)
        _step(f"evaluate {name} per task, held-out templates, then training templates")
        tasks[name] = evaluate_tasks(settings, data, exports / folder, out)
        held_in[name] = evaluate_tasks(settings, data, exports / folder, out, TEMPLATES)
        phase(f"eval_{folder}")
    seconds["total"] = round(time.perf_counter() - start, 1)
    results = {"tasks": tasks, "tasks_training_templates": held_in, "held_out_templates": HELDOUT_TEMPLATES,
               "training_templates": TEMPLATES,
               "captions_stage2_steps": settings.stage2_step_count, "stage2_steps": instruct_steps(settings), "seconds": seconds, "encoder": ENCODER,
               "lm": f"OPT stand-in pre-trained here for {settings.lm_steps} steps on captions and task questions under "
                     "every template, training and held-out (the language a real LLM knows; stage 2 trains on the "
                     "training templates only), then frozen", "settings": asdict(settings)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_instruct_summary(results, out)
    return results


def task_table(tasks: dict[str, dict]) -> list[str]:
    """The per-task table: accuracy on held-out templates, instruction-aware against plain, and the average."""
    names = list(FITS)
    lines = [f"  {'task':<10}" + "".join(f"{n:>20}" for n in names)]
    for task in TASKS:
        lines.append(f"  {task:<10}" + "".join(f"{tasks[n][task]['accuracy']:>19.1f}%" for n in names)
                     + f"   ({tasks[names[0]][task]['items']} test items)")
    average = {n: sum(tasks[n][t]["accuracy"] for t in TASKS) / len(TASKS) for n in names}
    lines.append(f"  {'average':<10}" + "".join(f"{average[n]:>19.1f}%" for n in names))
    return lines


def print_instruct_summary(results: dict, out: Path) -> None:
    print()
    print(f"qformer demo --instruct — per task accuracy on the held-out test split, with held-out templates "
          f"(both Q-Formers {results['stage2_steps']} stage-2 steps on the same task mixture, after "
          f"{results['captions_stage2_steps']} captions-only ones):")
    for line in task_table(results["tasks"]):
        print(line)
    print("the same models asked with the training templates (held-in phrasings; the difference is the template gap):")
    for line in task_table(results["tasks_training_templates"]):
        print(line)
    print("  time (s): " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()))
    print(f"  everything is in {out}/ (results.json, configs/, runs/, exports/)", file=sys.stdout)
