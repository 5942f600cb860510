"""Config files are read strictly: unknown keys, wrong types and missing files name the culprit."""

import json

import pytest
import torch

from qformer.config import Blip2Config, ConfigError, preset
from qformer.stage1 import Stage1Model


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    config = preset("vitg")
    path = tmp_path / f"model{suffix}"
    config.save(path)
    assert Blip2Config.from_file(path) == config


def test_unknown_key_is_named(tmp_path):
    data = preset("tiny").to_dict()
    data["qformer_config"]["hiden_size"] = 64
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad\.json.*qformer_config\.hiden_size"):
        Blip2Config.from_file(path)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_query_tokens: thirty-two\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*num_query_tokens must be int"):
        Blip2Config.from_file(path)
    path.write_text("vision_config: {drop_last_blocks: true}\n")
    with pytest.raises(ConfigError, match="vision_config.drop_last_blocks must be int"):
        Blip2Config.from_file(path)


def test_int_is_accepted_for_float_fields():
    config = Blip2Config.from_dict({"qformer_config": {"hidden_dropout_prob": 0}})
    assert config.qformer_config.hidden_dropout_prob == 0.0


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.json"):
        Blip2Config.from_file(tmp_path / "nope.json")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'vitz'"):
        preset("vitz")


def test_missing_weights_file_is_named(tmp_path):
    config = preset("tiny")
    config.vision_config.weights_path = str(tmp_path / "vit.safetensors")
    with pytest.raises(FileNotFoundError, match="vit.safetensors"):
        Stage1Model(config)


def test_mismatched_encoder_width_is_reported():
    config = preset("tiny")
    config.qformer_config.encoder_hidden_size = 48
    with pytest.raises(ValueError, match="encoder_hidden_size is 48 .* 32 wide"):
        Stage1Model(config)


def test_encoder_weights_load_from_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    config = preset("tiny")
    vc = config.vision_config
    source = timm.create_model(vc.model_name, num_classes=0, img_size=vc.image_size, **vc.model_kwargs)
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    vc.weights_path = str(tmp_path / "vit.safetensors")
    encoder = Stage1Model(config).visual_encoder
    assert torch.equal(encoder.model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert len(encoder.model.blocks) == len(source.blocks) - 1

    wrong = {k + "_renamed": v for k, v in source.state_dict().items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    vc.weights_path = str(tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match=r"wrong\.safetensors does not fit"):
        Stage1Model(config)
