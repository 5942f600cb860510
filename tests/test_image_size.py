"""An image encoder made at one image size runs at another: its position embeddings resampled as timm and LAVIS do."""

import logging

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from qformer.bert import load_tokenizer
from qformer.config import VisionConfig, preset
from qformer.folders import load_stage1, save_encoder_weights, save_stage1
from qformer.stage1 import Stage1Model
from qformer.vision import FrozenImageEncoder
from stages.data.captions import CaptionDataModule
from stages.data.synthetic import make_dataset

TINY_EVA = VisionConfig(model_name="eva_giant_patch14_clip_224", image_size=32, precision="fp32",
                        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 4.0})


def lavis_interpolate(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """LAVIS's `eva_vit.interpolate_pos_embed`, written out: CLS kept, the grid bicubic without antialiasing."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(grid.shape[1] ** 0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def encoder(vision: VisionConfig) -> FrozenImageEncoder:
    torch.manual_seed(0)
    return FrozenImageEncoder(VisionConfig(**{**vision.__dict__, "model_kwargs": dict(vision.model_kwargs)}))


@pytest.mark.parametrize("vision", [TINY_EVA, preset("tiny").vision_config], ids=["eva", "vit"])
def test_resize_resamples_the_position_embeddings_as_timm_and_lavis(vision):
    model = encoder(vision)
    before = model.model.pos_embed.detach().clone()  # (1, 1 + 4x4, 32)
    model.resize(48)
    after = model.model.pos_embed.detach()
    assert after.shape == (1, 1 + 6 * 6, 32)
    torch.testing.assert_close(after, resample_abs_pos_embed(before, [6, 6], num_prefix_tokens=1, antialias=False))
    torch.testing.assert_close(after, lavis_interpolate(before, 6))
    assert model.config.image_size == 48
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 37, 32)
    assert not model.model.pos_embed.requires_grad  # still frozen


def test_a_weights_file_made_at_another_size_loads_as_resize_makes_it(tmp_path):
    """Loading (timm's checkpoint filter) and resizing in place give the same encoder, so an export made after a resize
    reloads with the weights it trained with."""
    small = encoder(TINY_EVA)
    file = save_encoder_weights(small.model.state_dict(), tmp_path)
    small.resize(48)
    loaded = encoder(VisionConfig(**{**TINY_EVA.__dict__, "image_size": 48, "weights_path": str(file)}))
    torch.testing.assert_close(loaded.model.pos_embed, small.model.pos_embed, rtol=0, atol=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image_size_data")
    make_dataset(folder, num_images=2, seed=0)
    return load_tokenizer(folder)


def test_a_stage1_export_made_at_32_px_trains_and_reloads_at_48(tmp_path, caplog, tokenizer):
    save_stage1(Stage1Model(preset("tiny")), tokenizer, tmp_path / "small")
    model, tokenizer = load_stage1(tmp_path / "small")
    data = CaptionDataModule(train="unused.json", image_size=48)
    with caplog.at_level(logging.INFO, logger="qformer.vision"):
        data.check_encoder(model.visual_encoder)  # what training's setup does with the data's image size
    assert [r.getMessage() for r in caplog.records] == [
        "image encoder: position embeddings resampled from a 4x4 to a 6x6 grid (32 -> 48 px, bicubic) for data.image_size"]
    assert model.config.vision_config.image_size == 48
    save_stage1(model, tokenizer, tmp_path / "large")
    reloaded, _ = load_stage1(tmp_path / "large")
    assert reloaded.config.vision_config.image_size == 48
    torch.testing.assert_close(reloaded.visual_encoder.model.pos_embed, model.visual_encoder.model.pos_embed, rtol=0, atol=0)


@pytest.mark.parametrize("vision, size, message", [
    (preset("tiny").vision_config, 36, r"^data.image_size 36: the image encoder \(vit_tiny_patch16_224, made for 32 px\) "
                                       r"must be a multiple of the image encoder's patch size 8 \(e.g. 32 or 40\)$"),
    (VisionConfig(model_name="cait_xxs24_224", image_size=32, precision="fp32",
                  model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}), 48,
     r"^data.image_size 48: the image encoder \(cait_xxs24_224, made for 32 px\) timm model Cait cannot change its "
     r"input size \(it has no set_input_size\)$"),
], ids=["not-a-patch-multiple", "cait"])
def test_a_size_the_encoder_cannot_take_is_refused_in_one_line(vision, size, message):
    data = CaptionDataModule(train="unused.json", image_size=size)
    with pytest.raises(ValueError, match=message):
        data.check_encoder(encoder(vision))


def test_a_checkpoint_carries_the_image_size_it_trained_at(tokenizer):
    """A module rebuilt from its hyper-parameters (resume, `qformer export`) is made at its start's size: the checkpoint's
    size resizes it before its weights are loaded."""
    from stages.train.stage1 import Stage1Module

    trained = Stage1Module(config="tiny", tokenizer=tokenizer.name_or_path)
    trained.model.visual_encoder.resize(48)
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    rebuilt = Stage1Module(config="tiny", tokenizer=tokenizer.name_or_path)
    rebuilt.on_load_checkpoint(checkpoint)
    rebuilt.load_state_dict(checkpoint["state_dict"])
    assert rebuilt.model.config.vision_config.image_size == 48
    torch.testing.assert_close(rebuilt.model.visual_encoder.model.pos_embed, trained.model.visual_encoder.model.pos_embed)
