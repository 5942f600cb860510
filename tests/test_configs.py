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
