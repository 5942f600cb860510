"""configs/finetune/: the recipes that mirror LAVIS's fine-tunes parse against the CLI's signatures, and the tiny version
of each runs two steps of a fit with the image encoder trained."""

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from test_configs import stage_parser

from stages.train.stage1 import Stage1Module
from stages.train.stage2 import Stage2Module

FINETUNE = Path(__file__).resolve().parents[1] / "configs" / "finetune"
PAPER = ["retrieval_coco.yaml", "caption_coco_opt2.7b.yaml", "caption_coco_flant5xl.yaml", "vqa_vqav2_flant5xl.yaml"]
TINY = {"retrieval_coco.yaml": "tiny_retrieval.yaml", "caption_coco_opt2.7b.yaml": "tiny_caption_opt.yaml",
        "caption_coco_flant5xl.yaml": "tiny_caption_t5.yaml", "vqa_vqav2_flant5xl.yaml": "tiny_vqa.yaml"}
HAS_QFORMER_TEXT_INPUT = "qformer_text_input" in inspect.signature(Stage2Module).parameters
NEEDS_TEXT_INPUT = pytest.mark.skipif(not HAS_QFORMER_TEXT_INPUT, reason="model.qformer_text_input (the instruction-aware "
                                      "Q-Former) is not built yet: branch `instruct`")


def stage_of(path: Path) -> str:
    model = yaml.safe_load(path.read_text())["model"]
    return "stage2" if "lm_path" in model or "lm_config" in model else "stage1"


def with_marks(names):
    return [pytest.param(n, marks=NEEDS_TEXT_INPUT) if "vqa" in n else n for n in names]


def test_every_recipe_has_a_tiny_version():
    assert sorted(p.name for p in FINETUNE.glob("*.yaml")) == sorted(PAPER + list(TINY.values()))


@pytest.mark.parametrize("name", with_marks(PAPER))
def test_recipe_parses_with_lavis_values(name):
    path = FINETUNE / name
    config = stage_parser(Stage1Module if stage_of(path) == "stage1" else Stage2Module).parse_args(["--config", str(path)])
    assert config.model.train_vision and config.model.gradient_checkpointing
    assert config.model.lr == 1e-5 and config.model.min_lr == 0.0 and config.model.warmup_steps == 1000
    assert config.model.weight_decay == 0.05 and config.trainer.max_epochs == 5
    assert config.data.image_size in (364, 490)
    assert "LAVIS:" in path.read_text() or "paper:" in path.read_text()  # the original's values beside ours
    if name == "retrieval_coco.yaml":
        assert config.model.vision_lr_decay == 0.95 and config.model.val_k_test == 128
    if name.startswith("caption"):
        assert config.model.prompt.strip() == "a photo of" and config.model.val_num_beams == 5


# --- the tiny versions run ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stages.data.synthetic import make_dataset

    folder = tmp_path_factory.mktemp("finetune_data")
    make_dataset(folder, num_images=12, seed=4)
    return folder


def start_export(path: Path, data: Path, out: Path) -> Path:
    """The export the tiny config starts from: stage 1, or stage 2 against the config's own LM."""
    from tiny_models import write_stage1

    from qformer.bert import load_tokenizer
    from qformer.config import LanguageModelConfig, preset
    from qformer.folders import save_stage2
    from qformer.language_model import load_lm_tokenizer
    from qformer.stage2 import Stage2Model

    if stage_of(path) == "stage1":
        return write_stage1(data, out)
    model = yaml.safe_load(path.read_text())["model"]
    config = preset("tiny")
    config.qformer_config.vocab_size = len(load_tokenizer(data))
    tokenizer = data / Path(model["lm_tokenizer"]).name
    config.language_model = LanguageModelConfig(config=model["lm_config"], tokenizer=str(tokenizer), precision="fp32",
                                                eos_text=model.get("eos_text"))
    return save_stage2(Stage2Model(config), load_lm_tokenizer(config.language_model), out)


@pytest.mark.parametrize("name", with_marks(TINY.values()))
def test_tiny_recipe_fine_tunes_the_encoder_for_two_steps(name, data, tmp_path):
    from qformer.files import read_safetensors
    from qformer.folders import ENCODER_FILE
    from stages.train.lightning_cli import run_training

    path = FINETUNE / name
    stage = stage_of(path)
    split = yaml.safe_load(path.read_text())["data"]["train"]
    argv = ["fit", "--config", str(path), "--model.init_from", str(start_export(path, data, tmp_path / "start")),
            "--data.train", str(data / Path(split).name), "--data.val", "null", "--data.image_root", str(data),
            "--data.batch_size", "4", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false"]
    if stage == "stage2":
        argv += ["--model.lm_tokenizer", str(data / Path(yaml.safe_load(path.read_text())["model"]["lm_tokenizer"]).name)]
    if "vqa" in name:  # a plain stage-2 export lacks the Q-Former's text weights: they come from the stage-1 export
        from tiny_models import write_stage1

        argv += ["--model.stage1", str(write_stage1(data, tmp_path / "stage1")), "--data.batch_size", "1"]  # one question
    module = run_training(stage, argv).model
    encoder = module.model.visual_encoder
    assert encoder.trainable and encoder.model.grad_checkpointing and module.applied_steps == 2
    first = read_safetensors(tmp_path / "start" / ENCODER_FILE)["blocks.0.attn.qkv.weight"]
    saved = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not torch.equal(saved["model.visual_encoder.model.blocks.0.attn.qkv.weight"], first)  # trained, and saved


# --- qformer demo-finetune's parts ----------------------------------------------------------------------------------
def test_the_demo_finetunes_differ_only_in_train_vision(tmp_path, monkeypatch):
    from stages.demo import finetune

    monkeypatch.setattr(finetune, "_image_size", lambda out: 48)
    frozen, trained = (yaml.safe_load(finetune.finetune_config(tmp_path, name, name == "trained", 300, 1e-3, 0.9, 48, 0, 3.0).read_text())
                       for name in ("frozen", "trained"))
    for config in (frozen, trained):
        stage_parser().parse_object(config)  # valid stage-1 fit configs
    assert trained["model"].pop("train_vision") and not frozen["model"].pop("train_vision")
    assert trained["model"].pop("vision_lr_decay") == 0.9 and trained["model"].pop("vision_lr_scale") == 3.0
    assert trained["model"] == frozen["model"] and trained["data"] == frozen["data"]
    assert trained["trainer"].pop("default_root_dir") != frozen["trainer"].pop("default_root_dir")
    assert trained["trainer"] == frozen["trainer"] and trained["trainer"]["max_steps"] == 300


def test_the_demo_caption_finetunes_continue_the_stage2_export_with_its_lm_and_differ_only_in_train_vision(tmp_path, monkeypatch):
    from stages.demo import finetune

    monkeypatch.setattr(finetune, "_image_size", lambda out: 48)
    (tmp_path / "configs").mkdir()
    demo_model = {"stage1": "x/exports/stage1", "lm_path": "x/lm", "lm_precision": "fp32", "prompt": "a photo of ", "eos_text": "</s>",
                  "max_text_length": 32, "lr": 2e-3}
    demo = {"trainer": {"accelerator": "cpu", "max_steps": 1000, "val_check_interval": 500}, "model": demo_model,
            "data": {"features": "x/features/train", "val": "x/val.json"}}
    (tmp_path / "configs" / "stage2.yaml").write_text(yaml.safe_dump(demo))
    frozen, trained = (yaml.safe_load(finetune.caption_config(tmp_path, name, name == "trained", 100, 1e-3, 3.0, 48, 0).read_text())
                       for name in ("frozen", "trained"))
    for config in (frozen, trained):
        stage_parser(Stage2Module).parse_object(config)  # valid stage-2 fit configs
    model = trained["model"]
    assert model["init_from"] == str(tmp_path / "exports" / "stage2") and model["init_projection"] == "keep" and "stage1" not in model
    assert {k: model[k] for k in ("lm_path", "prompt", "eos_text", "max_text_length")} == {
        k: demo_model[k] for k in ("lm_path", "prompt", "eos_text", "max_text_length")}  # the demo's own LM and prompt
    assert "features" not in trained["data"] and "val" not in trained["data"]  # images read by both, no validation
    assert trained["trainer"]["max_steps"] == 100 and "val_check_interval" not in trained["trainer"]
    assert trained["model"].pop("train_vision") and not frozen["model"].pop("train_vision")
    assert trained["model"].pop("vision_lr_scale") == 3.0
    assert trained["model"] == frozen["model"] and trained["data"] == frozen["data"]


def test_the_shape_probe_reads_a_linearly_coded_label_and_not_noise():
    from stages.demo.finetune import linear_probe_accuracy

    labels = torch.randint(0, 3, (600,))
    coded = torch.randn(600, 16) + 3 * torch.nn.functional.one_hot(labels, 16)
    assert linear_probe_accuracy(coded[:400], labels[:400], coded[400:], labels[400:]) > 95
    noise = torch.randn(600, 16)
    assert linear_probe_accuracy(noise[:400], labels[:400], noise[400:], labels[400:]) < 50
