"""Every YAML under configs/ parses against the CLI's signatures and its model builds (meta device)."""

from pathlib import Path

import pytest
from jsonargparse import ArgumentParser
from pytorch_lightning import Trainer

from qformer.accounting import stage1_parameter_counts
from stages.data import CaptionDataModule
from stages.stage1 import Stage1Module, resolve_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def stage1_parser() -> ArgumentParser:
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_argument("--seed_everything", type=int | bool | None)
    parser.add_class_arguments(Trainer, "trainer")
    parser.add_class_arguments(Stage1Module, "model")
    parser.add_class_arguments(CaptionDataModule, "data")
    return parser


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "stage1"], ids=lambda p: p.name)
def test_stage1_config_parses_and_builds(path):
    config = stage1_parser().parse_args(["--config", str(path)])
    counts = stage1_parameter_counts(resolve_config(config.model.config))
    assert counts["trainable"] > 0
    assert config.data.image_size == resolve_config(config.model.config).vision_config.image_size


def test_a_typo_in_a_config_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  learning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        stage1_parser().parse_args(["--config", str(bad)])
