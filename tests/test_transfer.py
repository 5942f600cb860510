"""Stage-2 transfer (a Q-Former trained against one LM starts stage 2 against another) and the projection warm-up."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from qformer.bert import load_tokenizer
from qformer.config import LanguageModelConfig, preset
from qformer.stage2 import Stage2Model
from qformer.transfer import load_for_transfer, word_converter
from stages.cli import main
from stages.data.synthetic import make_dataset
from stages.train.optim import HeadStart, configure_adamw, drop_held_gradients
from stages.train.stage2 import Stage2Module

from tiny_models import write_stage1, write_stage2

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"model_type": "llama", "vocab_size": 128, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128, "bos_token_id": 2, "eos_token_id": 2,
         "pad_token_id": 1}
T5 = {"model_type": "t5", "vocab_size": 128, "d_model": 40, "d_ff": 64, "d_kv": 20, "num_layers": 1, "num_heads": 2,
      "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
CARRIED = ("qformer.", "ln_vision.")  # what a transfer takes from the source export


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    make_dataset(folder, num_images=24, seed=2)
    return folder


@pytest.fixture(scope="module")
def opt_export(data, tmp_path_factory):
    """The source: a tiny stage-2 export against a one-layer OPT (width 32)."""
    return write_stage2(data, tmp_path_factory.mktemp("exports") / "opt", seed=3)


def module(data, init_from, lm=LLAMA, kind="decoder", **options) -> Stage2Module:
    return Stage2Module(init_from=str(init_from), lm_config=lm, lm_tokenizer=str(data / f"lm_tokenizer_{kind}"), lm_precision="fp32",
                        eos_text="</s>", **options)


# --- transfer ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lm,kind,width", [(LLAMA, "decoder", 48), (T5, "t5", 40)])
def test_transfer_carries_the_qformer_and_ln_vision_bit_identical_with_a_projection_of_the_new_width(data, opt_export, lm, kind, width):
    source = load_file(str(opt_export / "model.safetensors"))
    model = module(data, opt_export, lm, kind).model
    state = model.state_dict()
    carried = [k for k in source if k.startswith(CARRIED)]
    assert len(carried) > 20 and set(carried) == {k for k in state if k.startswith(CARRIED)}
    for key in carried:
        assert torch.equal(state[key], source[key]), key
    assert source["language_projection.weight"].shape == (32, 32)  # the OPT's width
    assert model.language_projection.weight.shape == (width, 32) and model.language_projection.bias.shape == (width,)
    assert model.language_model.model.config.model_type == lm["model_type"]


def test_transfer_refuses_another_qformer_config_or_image_encoder_naming_the_field(data, opt_export):
    for change, message in [
        (lambda c: setattr(c.qformer_config, "num_hidden_layers", 3), "qformer_config.num_hidden_layers is 2 there but 3 in this run"),
        (lambda c: setattr(c.vision_config, "image_size", 48), "vision_config.image_size is 32 there but 48 in this run"),
        (lambda c: setattr(c.vision_config, "model_name", "vit_small_patch16_224"),
         "vision_config.model_name is 'vit_tiny_patch16_224' there but 'vit_small_patch16_224' in this run"),
    ]:
        config = preset("tiny")
        config.qformer_config.vocab_size = len(load_tokenizer(data))
        change(config)
        config.language_model = LanguageModelConfig(config=LLAMA, precision="fp32")
        with pytest.raises(ValueError, match="model.init_from: .* another Q-Former or image encoder: ") as error:
            load_for_transfer(Stage2Model(config), opt_export)
        assert message in str(error.value) and "\n" not in str(error.value)


def fit_argv(data, root, *extra) -> list[str]:
    return ["stage2", "fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"),
            "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder"), "--data.train", str(data / "train.json"),
            "--data.val", "null", "--data.image_root", str(data), "--data.batch_size", "4",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]


@pytest.mark.parametrize("start,expected", [
    ("stage1_as_init_from", ("model.init_from: {stage1} is a stage-1 export; transfer starts from a stage-2 export (a stage-1 "
                             "export is given as model.stage1)")),
    ("both", "model.stage1 or model.init_from: give exactly one (a stage-1 export, or a stage-2 export to transfer from), got both"),
    ("neither", "model.stage1 or model.init_from: give exactly one (a stage-1 export, or a stage-2 export to transfer from), got neither"),
])
def test_a_wrong_start_is_one_line(data, opt_export, tmp_path, capsys, start, expected):
    stage1 = write_stage1(data, tmp_path / "stage1")
    options = {"stage1_as_init_from": ["--model.stage1", "null", "--model.init_from", str(stage1)],
               "both": ["--model.stage1", str(stage1), "--model.init_from", str(opt_export)],
               "neither": ["--model.stage1", "null"]}[start]
    assert main(fit_argv(data, tmp_path / "runs", *options)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"qformer stage2: error: {expected.format(stage1=stage1)}", err
    assert not any("Traceback" in line for line in err)


def test_lstsq_word_converter_recovers_a_linear_map_and_starts_the_projection(data, opt_export):
    torch.manual_seed(0)
    m, c = torch.randn(6, 4), torch.randn(6)
    source = torch.randn(400, 4)
    found_m, found_c = word_converter(source, source @ m.T + c)
    torch.testing.assert_close(found_m, m, rtol=0.05, atol=0.05)
    torch.testing.assert_close(found_c, c, rtol=0.05, atol=0.05)

    lstsq = module(data, opt_export, init_projection="lstsq").model
    new = module(data, opt_export).model
    assert lstsq.language_projection.weight.shape == new.language_projection.weight.shape == (48, 32)
    assert torch.isfinite(lstsq.language_projection.weight).all()
    assert not torch.equal(lstsq.language_projection.weight, new.language_projection.weight)
    assert torch.equal(lstsq.qformer.query_tokens, new.qformer.query_tokens)


# --- the projection warm-up: groups and schedule ----------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qformer = nn.Linear(4, 4)
        self.language_projection = nn.Linear(4, 3)

    def forward(self, x):
        return self.language_projection(self.qformer(x)).square().mean()


HEAD = HeadStart("language_projection.", steps=3, lr_scale=5.0)


def test_warmup_groups_and_their_lr_and_weight_decay_per_step():
    toy = Toy()
    setup = configure_adamw(toy, lr=1e-3, min_lr=1e-4, weight_decay=0.05, warmup_steps=2, total_steps=9, head_start=HEAD)
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    names = {id(p): n for n, p in toy.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups] == [
        ["qformer.weight"], ["qformer.bias"], ["language_projection.weight"], ["language_projection.bias"]]
    rows = []
    for _ in range(9):
        rows.append([(round(g["lr"], 9), g["weight_decay"]) for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    held, head = (0.0, 0.05), (5e-3, 0.0)
    assert rows[:3] == [[held, (0.0, 0.0), head, (5e-3, 0.0)]] * 3  # projection alone, 5 x lr, no decay
    assert rows[3] == [(5e-4, 0.05), (5e-4, 0.0), (5e-4, 0.05), (5e-4, 0.0)]  # then the usual warmup, counted from step 3
    assert [r[0][0] for r in rows[4:]] == [r[2][0] for r in rows[4:]]  # both groups on one schedule after it
    assert rows[4][0][0] == 1e-3 and math.isclose(rows[8][0][0], 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel_tol=1e-6)


def test_adamw_leaves_the_held_qformer_and_its_state_untouched_through_the_warmup_and_moves_it_after():
    toy = Toy()
    setup = configure_adamw(toy, lr=1e-2, min_lr=1e-3, weight_decay=0.05, warmup_steps=1, total_steps=6, head_start=HEAD)
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    start = {k: v.clone() for k, v in toy.state_dict().items()}
    for step in range(5):
        toy(torch.randn(8, 4)).backward()
        drop_held_gradients(optimizer, schedule.last_epoch)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step < HEAD.steps:
            assert torch.equal(toy.qformer.weight, start["qformer.weight"]) and torch.equal(toy.qformer.bias, start["qformer.bias"])
            assert toy.qformer.weight not in optimizer.state and toy.qformer.bias not in optimizer.state  # no moments, no step count
            assert not torch.equal(toy.language_projection.weight, start["language_projection.weight"])
    assert not torch.equal(toy.qformer.weight, start["qformer.weight"])
    assert optimizer.state[toy.qformer.weight]["step"].item() == 2  # its own first two steps, after the warm-up


def test_lr_zero_alone_would_not_leave_adamw_state_untouched():
    """Why the held parameters' gradients are dropped rather than given lr 0: AdamW would still count the step and
    move the moments (and, with decay, the fused kernel still runs over them)."""
    p = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([{"params": [p], "lr": 0.0}], weight_decay=0.05)
    p.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(p.detach(), torch.ones(3)) and optimizer.state[p]["exp_avg"].abs().sum() > 0


def test_warmup_options_are_checked_in_one_line(data, opt_export):
    for options, message in [
        ({"projection_warmup_steps": -1}, "model.projection_warmup_steps must be >= 0"),
        ({"projection_warmup_steps": 2, "projection_lr_scale": 0.0}, "model.projection_lr_scale must be > 0"),
        ({"projection_lr_scale": 5.0}, "model.projection_lr_scale applies during the projection warm-up only"),
        ({"init_projection": "pinv"}, "model.init_projection must be new, lstsq or keep, got 'pinv'"),
    ]:
        with pytest.raises(ValueError, match=message):
            module(data, opt_export, **options)


# --- the warm-up in a fit, and resume inside and after it ---------------------------------------------------------------
WARMUP, STEPS = 3, 6


def warmup_fit(data, export, root, steps, *extra) -> None:
    argv = fit_argv(data, root, "--model.stage1", "null", "--model.init_from", str(export), "--model.lm_config",
                    str(LLAMA).replace("'", '"'), "--model.projection_warmup_steps", str(WARMUP), "--model.projection_lr_scale", "5",
                    "--model.warmup_steps", "2", "--model.save_every_n_steps", "1", "--model.val_caption", "false",
                    "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1", *extra)
    assert main(argv) == 0


def checkpoint(root: Path) -> dict:
    from stages.train.resume import find_checkpoint

    return torch.load(find_checkpoint("last", root), map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def whole_run(data, opt_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    warmup_fit(data, opt_export, root, STEPS)
    return checkpoint(root)["state_dict"]


def test_in_a_fit_the_qformer_is_held_through_the_warmup_and_trains_after_it(data, opt_export, whole_run, tmp_path):
    source = load_file(str(opt_export / "model.safetensors"))
    warmup_fit(data, opt_export, tmp_path, WARMUP)
    held = checkpoint(tmp_path)
    qformer = [k for k in source if k.startswith("qformer.")]
    assert all(torch.equal(held["state_dict"]["model." + k], source[k]) for k in qformer)
    state = held["optimizer_states"][0]["state"]
    groups = held["optimizer_states"][0]["param_groups"]
    assert [g.get("held_until") for g in groups] == [WARMUP, WARMUP, None, None]
    assert not any(i in state for g in groups[:2] for i in g["params"])  # no AdamW state for the Q-Former yet
    assert all(state[i]["step"].item() == WARMUP for g in groups[2:] for i in g["params"])
    assert not all(torch.equal(whole_run["model." + k], source[k]) for k in qformer)  # it moves after


@pytest.mark.parametrize("stop", [2, 4])  # inside the warm-up, and after it
def test_resume_inside_and_after_the_warmup_equals_an_uninterrupted_run(data, opt_export, whole_run, tmp_path, stop):
    warmup_fit(data, opt_export, tmp_path, stop)
    warmup_fit(data, opt_export, tmp_path, STEPS, "--ckpt_path", "last")
    resumed = checkpoint(tmp_path)
    assert resumed["global_step"] == STEPS
    for key, value in whole_run.items():
        assert torch.equal(resumed["state_dict"][key], value), key


# --- `qformer demo --lm smollm2` goes the transfer route ------------------------------------------------------------------
@pytest.fixture
def tiny_llama_as_smollm2(tmp_path, monkeypatch):
    """A tiny random Llama folder in place of SmolLM2's GGUF file: the route is tested, not SmolLM2 (whose slow demo
    test in test_llm.py measures the targets), in seconds instead of minutes of loading and stepping a 135M LM."""
    import transformers
    from test_prompt_masking import llama_bpe

    from stages.demo import pipeline

    folder = tmp_path / "tiny_llama"
    tokenizer = llama_bpe()
    config = transformers.LlamaConfig(**{**LLAMA, "vocab_size": len(tokenizer), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    monkeypatch.setattr(pipeline, "smollm2_gguf", lambda: folder)
    monkeypatch.setattr(pipeline, "check_gguf", lambda path: path)
    return folder


def test_small_smollm2_demo_transfers_from_the_stand_ins_stage2_with_a_projection_warmup(tiny_llama_as_smollm2, tmp_path, capsys,
                                                                                          monkeypatch):
    """A tiny run of the route: the stand-in OPT's stage 2, then stage 2 into the real LLM from that export with the
    projection warm-up, both printed in the summary. Nothing slow runs twice: the SmolLM2 fit validates by its loss
    alone (eval_caption captions the test split), and the stage-2 export is loaded once for evaluation and examples."""
    import qformer.folders
    from stages.demo.settings import cpu_has_fast_bf16

    loaded = []
    monkeypatch.setattr(qformer.folders, "load_stage2", lambda folder, *a, _load=qformer.folders.load_stage2, **k:
                        loaded.append(str(folder)) or _load(folder, *a, **k))
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--lm", "smollm2", "--num-images", "40", "--val-images", "4", "--test-images", "4",
            "--lm-steps", "4", "--stage1-steps", "4", "--transfer-source-steps", "4", "--stage2-steps", "4", "--batch-size", "8",
            "--num-beams", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "stage2_source: stand-in OPT (transfer source), 4 steps of batch 8" in printed
    assert "stage2: SmolLM2 (transferred, projection warm-up), 4 steps of batch 4, the first 1 the projection alone" in printed
    results = json.loads((out / "results.json").read_text())
    assert [f["name"] for f in results["stage2_fits"]] == ["stage2_source", "stage2"]
    assert all(f["val_loss"] is not None for f in results["stage2_fits"])
    assert {"lm_pretraining", "stage2_source", "stage2"} <= set(results["seconds"])
    assert results["lm_eval_precision"] == ("bf16" if cpu_has_fast_bf16() else "fp32")  # it generates as it trained
    transfer = yaml.safe_load((out / "configs" / "stage2.yaml").read_text())["model"]
    assert transfer["init_from"] == str(out / "exports" / "stage2_source") and "stage1" not in transfer
    assert transfer["lm_path"] == str(tiny_llama_as_smollm2)
    assert transfer["projection_warmup_steps"] == 1 and transfer["projection_lr_scale"] == 5.0
    assert transfer["val_caption"] is False
    assert loaded == [str(out / "exports" / "stage2")]
    source = load_file(str(out / "exports" / "stage2_source" / "model.safetensors"))
    final = load_file(str(out / "exports" / "stage2" / "model.safetensors"))
    assert source["language_projection.weight"].shape[0] == 128  # the stand-in OPT's width
    assert final["language_projection.weight"].shape[0] == LLAMA["hidden_size"]  # the new LM's
    assert not torch.equal(final["qformer.query_tokens"], source["qformer.query_tokens"])  # trained on after the warm-up


@pytest.mark.parametrize("lm, stage1, source, target", [("opt", 900, 1000, None), ("smollm2", 600, 3000, 360)])
def test_the_demos_step_budgets_go_where_they_buy_the_most(tmp_path, lm, stage1, source, target):
    """With SmolLM2 the demo moves stage-1 steps to the cheap stand-in stage 2 it transfers from; the opt demo keeps its
    own budget, and an explicit --stage1-steps / --transfer-source-steps still wins."""
    from stages.demo.settings import DemoSettings, write_configs

    def fits(settings):
        gguf = tmp_path / "smollm2.gguf" if settings.pretrained_lm else None
        paths = write_configs(settings, tmp_path / lm, tmp_path / "data", 40, tmp_path / "lm", tmp_path / "w", gguf)
        return {name: yaml.safe_load(path.read_text()) for name, path in paths.items() if name != "model"}

    written = fits(DemoSettings(lm=lm))
    assert written["stage1"]["trainer"]["max_steps"] == stage1
    assert written["stage2_source" if target else "stage2"]["trainer"]["max_steps"] == source
    if target:
        assert written["stage2"]["trainer"]["max_steps"] == target
        # The SmolLM2 stage validates on one caption per val image; the stand-in's fits on all of them.
        assert written["stage2"]["data"]["val_captions_per_image"] == 1
    assert "val_captions_per_image" not in written["stage1"]["data"]
    assert "val_captions_per_image" not in written["stage2_source" if target else "stage2"]["data"]
    chosen = fits(DemoSettings(lm=lm, stage1_steps=7, transfer_source_steps=5, stage2_steps=3))
    assert chosen["stage1"]["trainer"]["max_steps"] == 7
    assert chosen["stage2"]["trainer"]["max_steps"] == 3
