"""The main job: `qformer demo` end to end (a very small setting here; the default one under `-m slow`)."""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from qformer.folders import load_stage1, load_stage2
from stages.cli import main
from stages.demo.pipeline import attribute_accuracy

RESULT_KEYS = {"retrieval", "caption", "vqa", "seconds", "encoder", "lm"}


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_small_demo_writes_every_artefact_and_they_load(tmp_path, capsys, lm, request):
    from stages.eval.metrics import java_available

    java = lm == "opt" and java_available()  # the one test that scores captions with Java (METEOR), where it runs
    if lm != "opt":
        request.getfixturevalue("without_java")
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--lm", lm, "--num-images", "60", "--val-images", "8", "--test-images", "8", "--lm-steps", "10", "--stage1-steps", "12", "--stage2-steps", "12", "--batch-size", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "text retrieval R@1" in printed and "attribute accuracy" in printed

    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert {"txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"} <= set(results["retrieval"])
    assert {"bleu4", "cider", "attribute_accuracy"} <= set(results["caption"])
    assert ("meteor" in results["caption"]) == java
    assert results["vqa"]["questions"] == 8 and 0 <= results["vqa"]["accuracy"] <= 100
    assert {"data", "lm_pretraining", "stage1", "stage2", "eval_retrieval", "eval_caption", "eval_vqa", "total"} <= set(results["seconds"])
    assert "randomly initialised" in results["encoder"]
    assert results["lm_eval_precision"] == "fp32"  # the stand-in LM as configured: only SmolLM2 switches to bf16
    for name in ("samples.png", "losses.png", "configs/stage1.yaml", "configs/stage2.yaml", "configs/model.json"):
        assert (out / name).is_file(), name
    assert list((out / "runs" / "stage1").rglob("metrics.csv")) and list((out / "runs" / "stage2").rglob("*.ckpt"))
    model, tokenizer = load_stage1(out / "exports" / "stage1")
    assert model.config.num_query_tokens == 8
    # The random encoder comes from the demo's local weights file, with its fixed 2-D sin-cos position embedding.
    vit = model.visual_encoder.model
    sincos = build_sincos2d_pos_embed(list(vit.patch_embed.grid_size), vit.embed_dim)
    torch.testing.assert_close(vit.pos_embed[0, vit.num_prefix_tokens:], sincos, rtol=0, atol=0)
    model, tokenizer = load_stage2(out / "exports" / "stage2")
    assert model.is_encoder_decoder == (lm == "t5")
    assert len(results["examples"]) == 4 and all("answer" in e for e in results["examples"])


def test_attribute_accuracy_counts_every_object():
    entries = [
        {"image_id": 1, "objects": [{"color": "red", "shape": "circle", "size": "small"}]},
        {"image_id": 2, "objects": [{"color": "red", "shape": "circle", "size": "small"}, {"color": "blue", "shape": "square", "size": "large"}]},
    ]
    predictions = {"1": "a small red circle", "2": "a small red circle to the left of a large green square"}
    assert attribute_accuracy(predictions, entries) == 0.5
    predictions["2"] = "a large blue square to the right of a small red circle"
    assert attribute_accuracy(predictions, entries) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("lm", ["opt"])
def test_default_demo_meets_its_targets(tmp_path, lm):
    """The issue's targets, measured by the demo itself: under 10 minutes on 2 CPU cores, R@1 >= 50 % both ways,
    attribute accuracy >= 60 % on >= 200 held-out images, and the same numbers again with the same seed."""
    first = run_default(tmp_path / "a", lm)
    assert first["retrieval"]["images"] >= 200
    assert first["retrieval"]["txt_r1"] >= 50 and first["retrieval"]["img_r1"] >= 50
    assert first["caption"]["attribute_accuracy"] >= 60 and first["caption"]["cider"] > 0
    assert first["seconds"]["total"] < 600
    second = run_default(tmp_path / "b", lm)
    assert second["retrieval"] == first["retrieval"]
    assert second["caption"] == first["caption"]


def run_default(out: Path, lm: str) -> dict:
    assert main(["demo", "--out", str(out), "--lm", lm]) == 0
    return json.loads((out / "results.json").read_text())


def test_small_instruct_demo_reports_each_task_for_both_qformers(tmp_path, capsys):
    """`qformer demo --instruct` in a very small setting: the task files and templates, both stage-2 fits (instruction-
    aware and plain, the same steps), and the per-task table on held-out templates, printed and in results.json."""
    from stages.demo.instruct import TASKS

    out = tmp_path / "demo"
    argv = ["demo", "--instruct", "--out", str(out), "--num-images", "40", "--val-images", "4", "--test-images", "6",
            "--lm-steps", "5", "--stage1-steps", "6", "--stage2-steps", "6", "--batch-size", "8", "--num-beams", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out templates" in printed and all(task in printed for task in TASKS)
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"instruction-aware", "plain"}
    for scores in results["tasks"].values():
        assert set(scores) == set(TASKS) and all(0 <= s["accuracy"] <= 100 and s["items"] > 0 for s in scores.values())
    assert load_stage2(out / "exports" / "stage2")[0].config.qformer_text_input
    assert not load_stage2(out / "exports" / "stage2_plain")[0].config.qformer_text_input
    # both start from a captions-only stage 2 (as InstructBLIP from a finished BLIP-2), its projection kept
    assert not load_stage2(out / "exports" / "stage2_captions")[0].config.qformer_text_input
    for fit in ("stage2", "stage2_plain"):
        model = yaml.safe_load((out / "configs" / f"{fit}.yaml").read_text())["model"]
        assert (model["init_from"], model["init_projection"]) == (str(out / "exports" / "stage2_captions"), "keep")
    assert (results["captions_stage2_steps"], results["stage2_steps"]) == (6, 5)
    held_out = {t for ts in results["held_out_templates"].values() for t in ts}
    assert not held_out & {t for ts in results["training_templates"].values() for t in ts}
    # the same models asked with the training templates too, a second table: the template gap
    assert "training templates (held-in phrasings" in printed
    assert {name: set(scores) for name, scores in results["tasks_training_templates"].items()} == {n: set(TASKS) for n in results["tasks"]}
    # stage 2 trains on the training templates alone; only the stand-in LM's text pre-training reads the held-out ones
    trained = yaml.safe_load((out / "data" / "templates.yaml").read_text())
    assert {t for ts in trained.values() for t in ts} == {t for ts in results["training_templates"].values() for t in ts}


def test_the_stand_in_lms_text_pretraining_reads_every_template_held_out_ones_too():
    """The stand-in LM stands for an LLM that knows the language, the held-out phrasings too (a real one learnt them in
    its own pre-training); each template, training or held-out, comes up in its instruction pre-training text."""
    from stages.data.synthetic_tasks import HELDOUT_TEMPLATES, TEMPLATES, task_questions
    from stages.demo.language_model import instruction_pretraining_text

    objects = [{"color": "red", "shape": "circle", "size": "small"}, {"color": "blue", "shape": "square", "size": "large"}]
    sample, rng = {"objects": objects, "caption": "a small red circle to the left of a large blue square"}, random.Random(0)
    prefixes = {instruction_pretraining_text(sample, rng, encoder_decoder=False)[0] for _ in range(3000)}
    questions = [q for pairs in task_questions(objects).values() for q, _ in pairs]
    for templates in (TEMPLATES, HELDOUT_TEMPLATES):
        for template in templates["caption"]:
            assert template.replace("<Image>", "").strip() + " " in prefixes, template
        for template in templates["vqa"]:
            filled = {template.replace("<Image>", "").strip().replace("{}", q) + " " for q in questions}
            assert filled & prefixes, template


def test_instruct_demo_needs_the_stand_in_opt(capsys):
    assert main(["demo", "--instruct", "--lm", "t5"]) == 2
    assert "--instruct runs with the stand-in OPT" in capsys.readouterr().err


@pytest.mark.slow
def test_default_instruct_demo_meets_its_targets(tmp_path):
    """The issue's targets for `qformer demo --instruct`: >= 80 % on each held-in task with held-out templates (the
    instruction-aware Q-Former), both Q-Formers evaluated, within 12 minutes on 2 CPU cores."""
    assert main(["demo", "--instruct", "--out", str(tmp_path / "instruct")]) == 0
    results = json.loads((tmp_path / "instruct" / "results.json").read_text())
    assert all(s["accuracy"] >= 80 for s in results["tasks"]["instruction-aware"].values()), results["tasks"]
    assert set(results["tasks"]["plain"]) == set(results["tasks"]["instruction-aware"])
    assert results["seconds"]["total"] <= 720
