"""Every YAML under configs/ parses against the CLI's signatures and its model builds (meta device)."""

from pathlib import Path

import pytest
from jsonargparse import ArgumentParser
from pytorch_lightning import Trainer

from qformer.accounting import stage1_parameter_counts
from qformer.config import resolve_config
from stages.data.captions import CaptionDataModule
from stages.train.stage1 import Stage1Module
from stages.train.stage2 import Stage2Module

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def stage_parser(module=Stage1Module) -> ArgumentParser:
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_argument("--seed_everything", type=int | bool | None)
    parser.add_class_arguments(Trainer, "trainer")
    parser.add_class_arguments(module, "model")
    parser.add_class_arguments(CaptionDataModule, "data")
    return parser


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "stage1"], ids=lambda p: p.name)
def test_stage1_config_parses_and_builds(path):
    config = stage_parser().parse_args(["--config", str(path)])
    counts = stage1_parameter_counts(resolve_config(config.model.config))
    assert counts["trainable"] > 0
    assert config.data.image_size == resolve_config(config.model.config).vision_config.image_size


def test_a_typo_in_a_config_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  learning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        stage_parser().parse_args(["--config", str(bad)])


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "stage2"], ids=lambda p: p.name)
def test_stage2_config_parses_and_its_lm_builds(path):
    import torch

    from qformer.config import LanguageModelConfig, preset
    from qformer.stage2 import Stage2Model

    config = stage_parser(Stage2Module).parse_args(["--config", str(path)])
    assert config.model.min_lr < config.model.lr
    if config.model.lm_config is not None:  # the CPU configs: build the real thing on the meta device
        model_config = preset("tiny")
        model_config.language_model = LanguageModelConfig(config=config.model.lm_config)
        with torch.device("meta"):
            assert Stage2Model(model_config).trainable_parameters() > 0
    else:
        assert config.model.lm_path.startswith("/path/to/")  # the paper configs name a local folder to fill in


INSTRUCT = [p for p in CONFIGS if p.parent.name == "instruct" and not p.name.startswith("templates")]


@pytest.mark.parametrize("path", INSTRUCT, ids=lambda p: p.name)
def test_instruct_config_parses_with_the_instruction_aware_qformer_and_a_mixture(path):
    config = stage_parser(Stage2Module).parse_args(["--config", str(path)])
    assert config.model.qformer_text_input and config.model.min_lr < config.model.lr
    assert isinstance(config.data.train, list) and len(config.data.train) > 1 and config.data.templates
    if config.model.lm_config is None:
        assert config.model.lm_path.startswith("/path/to/")  # the paper configs name a local folder to fill in


def test_the_tiny_instruct_config_trains(tmp_path):
    """configs/instruct/tiny.yaml runs as its comment says, on `make-data --instruct` and a tiny stage-1 export (2 steps)."""
    import json

    import torch

    from qformer.bert import load_tokenizer
    from qformer.config import preset
    from qformer.folders import save_stage1
    from qformer.stage1 import Stage1Model
    from stages.cli import main
    from stages.data.synthetic import make_dataset

    data = tmp_path / "data"
    make_dataset(data, num_images=20, seed=1, instruct=True)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(load_tokenizer(data))
    save_stage1(Stage1Model(config), load_tokenizer(data), tmp_path / "stage1")
    [path] = [p for p in INSTRUCT if p.name == "tiny.yaml"]
    train = [str(data / Path(f).name) for f in stage_parser(Stage2Module).parse_args(["--config", str(path)]).data.train]
    assert main(["stage2", "fit", "--config", str(path), "--model.stage1", str(tmp_path / "stage1"),
                 "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder"), "--data.train", json.dumps(train),
                 "--data.templates", str(data / "templates.yaml"), "--data.val", str(data / "val.json"),
                 "--data.image_root", str(data), "--data.batch_size", "4", "--trainer.max_steps", "2",
                 "--trainer.val_check_interval", "2", "--model.val_max_new_tokens", "2", "--model.val_num_beams", "1",
                 "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]) in (0, None)
    checkpoint = torch.load(tmp_path / "runs" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["qformer_text_input"]
