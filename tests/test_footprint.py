"""`qformer info --batch-size`: the training memory plan, checked against what a real CPU step holds."""

import pytest
import torch

from qformer.config import LanguageModelConfig, VisionConfig, preset
from qformer.footprint import TRAINED_BYTES, training_footprint
from qformer.stage2 import Stage2Model
from stages.cli import main

OPT = dict(model_type="opt", vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
           word_embed_proj_dim=64, max_position_embeddings=128)


def small_stage2():
    """A stage-2 model whose activations dwarf its fixed costs: a wide EVA encoder on many patches, a small OPT."""
    config = preset("tiny")
    config.vision_config = VisionConfig(model_name="eva_giant_patch14_clip_224", image_size=64, precision="fp32",
                                        model_kwargs={"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 4.0})
    config.qformer_config.encoder_hidden_size = 64
    config.language_model = LanguageModelConfig(config=OPT, precision="fp32", max_text_length=16)
    return config


def saved_by_a_real_step(run, model) -> int:
    """Bytes of the tensors autograd keeps for the backward of `run()` on the CPU: real kernels and real storages,
    each storage once (by address), the model's weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = run()
    assert loss.requires_grad
    return sum(storages.values())


@pytest.mark.parametrize("train_vision", [False, True], ids=["frozen-encoder", "trained-encoder"])
def test_the_activation_estimate_is_within_a_fifth_of_a_real_cpu_step(train_vision):
    config = small_stage2()
    batch = 4
    plan = training_footprint(config, train_vision, activation_bytes=4)  # fp32, as the CPU run below
    torch.manual_seed(0)
    model = Stage2Model(config).train()
    if train_vision:  # until the encoder trains for real (model.train_vision), as `info --train-vision` counts it
        model.visual_encoder.model.requires_grad_(True)
        encode = model.visual_encoder.model.forward_features
    else:
        encode = model.visual_encoder
    pixels = torch.randn(batch, 3, 64, 64)
    ids = torch.randint(3, 128, (batch, 16))
    measured = saved_by_a_real_step(lambda: model(encode(pixels), ids, torch.ones_like(ids), ids), model)
    estimated = batch * plan.activations.total(checkpointing=False)
    assert 0.8 < estimated / measured < 1.25, (estimated, measured)


def test_parameters_are_counted_as_trained_or_frozen_and_checkpointing_keeps_block_inputs():
    config = small_stage2()
    config.vision_config.precision = "auto"  # frozen: stored in fp16 on a GPU
    frozen_encoder, trained_encoder = training_footprint(config, False), training_footprint(config, True)
    encoder = sum(p.numel() for p in Stage2Model(config).visual_encoder.parameters())
    assert trained_encoder.trained_parameters == frozen_encoder.trained_parameters + encoder
    assert trained_encoder.optimizer == trained_encoder.trained_parameters * TRAINED_BYTES["optimizer"]
    assert trained_encoder.weights - frozen_encoder.weights == encoder * (4 - 2)  # an fp32 master copy instead of fp16
    activations = trained_encoder.activations
    assert len(activations.blocks) == 3 + 2  # the encoder's blocks (its last one dropped), the Q-Former's layers
    assert activations.total(True) == sum(activations.block_inputs) + max(activations.blocks) + activations.other
    assert activations.total(True) < activations.total(False)
    assert activations.total(False) > frozen_encoder.activations.total(False)  # the encoder's activations are saved


def test_info_prints_the_memory_plan(capsys):
    assert main(["info", "--config", "tiny", "--train-vision", "--image-size", "48", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "training memory per GPU (stage 1, image encoder trained, 48 px, batch 8, mixed precision):" in out
    assert "activations, no checkpointing" in out and "activations, with checkpointing" in out


def test_info_refuses_a_plan_without_a_batch_size(capsys):
    assert main(["info", "--config", "tiny", "--train-vision"]) == 2
    assert "--train-vision and --image-size plan a run's memory: give --batch-size too" in capsys.readouterr().err
