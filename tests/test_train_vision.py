"""Fine-tuning with the image encoder trained (`model.train_vision`): layer-wise lr groups, fp32 master weights under
bf16-mixed, gradient checkpointing of its blocks, exports that carry (and round-trip through transformers) its trained
weights, and a killed run that resumes to identical weights."""

from pathlib import Path

import pytest
import torch

from qformer.stage1 import Stage1Model
from stages.train.optim import configure_adamw

DECAY = 0.9


def encoder_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("visual_encoder.")}


def test_frozen_by_default_and_trainable_on_request(tiny_config):
    tiny_config.vision_config.precision = "bf16"
    frozen, trained = Stage1Model(tiny_config), Stage1Model(tiny_config, train_vision=True).train()
    assert not any(p.requires_grad for p in frozen.visual_encoder.parameters())
    assert all(p.requires_grad for p in trained.visual_encoder.parameters())
    assert next(frozen.visual_encoder.model.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in trained.visual_encoder.parameters()} == {torch.float32}  # fp32 whatever precision says
    assert trained.visual_encoder.training and not frozen.train().visual_encoder.training


def test_layer_decay_groups_hold_every_parameter_once_with_the_specified_factors(tiny_config):
    model = Stage1Model(tiny_config, train_vision=True)
    lr = 1e-3
    groups = configure_adamw(model, lr, 1e-4, 0.05, 2, 10, vision_lr_decay=DECAY)["optimizer"].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    placed = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each once, none missing
    assert encoder_names(model) <= set(placed)

    blocks = len(model.visual_encoder.model.blocks)
    assert blocks == 2  # the tiny preset: 3 blocks, the last dropped
    expected = {"visual_encoder.model.blocks.1.attn.qkv.weight": DECAY ** 1,  # the last block: one decay step
                "visual_encoder.model.blocks.0.mlp.fc1.bias": DECAY ** 2,
                "visual_encoder.model.patch_embed.proj.weight": DECAY ** 3,  # the embeddings: the lowest
                "visual_encoder.model.pos_embed": DECAY ** 3,
                "visual_encoder.model.cls_token": DECAY ** 3,
                "qformer.query_tokens": 1.0, "ln_vision.weight": 1.0, "vision_proj.weight": 1.0}
    factor = {names[id(p)]: g["initial_lr"] / lr for g in groups for p in g["params"]}  # the schedule multiplies these
    decay = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    for name, value in expected.items():
        assert factor[name] == pytest.approx(value), name
    for name in placed:  # one factor for a whole block
        if name.startswith("visual_encoder.model.blocks."):
            assert factor[name] == pytest.approx(DECAY ** (blocks - int(name.split(".")[3]))), name
    no_decay = ["visual_encoder.model.pos_embed", "visual_encoder.model.cls_token", "visual_encoder.model.blocks.0.norm1.weight",
                "visual_encoder.model.blocks.0.attn.qkv.bias", "visual_encoder.model.patch_embed.proj.bias", "qformer.query_tokens"]
    assert all(decay[n] == 0.0 for n in no_decay)
    assert all(decay[n] == 0.05 for n in ("visual_encoder.model.blocks.0.attn.qkv.weight", "visual_encoder.model.patch_embed.proj.weight"))


def test_vision_lr_scale_multiplies_the_encoders_groups_only(tiny_config):
    model = Stage1Model(tiny_config, train_vision=True)
    lr, scale = 1e-3, 30.0
    groups = configure_adamw(model, lr, 1e-4, 0.05, 2, 10, vision_lr_decay=DECAY, vision_lr_scale=scale)["optimizer"].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    placed = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each once, none missing
    factor = {names[id(p)]: g["initial_lr"] / lr for g in groups for p in g["params"]}
    expected = {"visual_encoder.model.blocks.1.attn.qkv.weight": scale * DECAY, "visual_encoder.model.blocks.0.norm1.weight": scale * DECAY ** 2,
                "visual_encoder.model.pos_embed": scale * DECAY ** 3, "qformer.query_tokens": 1.0, "vision_proj.weight": 1.0}
    for name, value in expected.items():
        assert factor[name] == pytest.approx(value), name
    alone = configure_adamw(model, lr, 1e-4, 0.05, 2, 10, vision_lr_scale=scale)["optimizer"].param_groups  # without decay
    encoder_factors = [g["initial_lr"] / lr for g in alone for p in g["params"] if names[id(p)] in encoder_names(model)]
    assert encoder_factors and encoder_factors == pytest.approx([scale] * len(encoder_factors))


@pytest.mark.parametrize("options, message", [({"vision_lr_scale": 0.0}, "model.vision_lr_scale must be above 0"),
                                              ({"vision_lr_scale": 10.0, "train_vision": False}, "model.vision_lr_scale applies to a trained")])
def test_a_vision_lr_scale_that_cannot_apply_is_refused_in_one_line(options, message):
    from stages.train.base import check_vision_options

    with pytest.raises(ValueError, match=message):
        check_vision_options(options.get("train_vision", True), 1.0, options["vision_lr_scale"])


def test_a_frozen_encoder_keeps_the_two_groups_of_before(tiny_config):
    groups = configure_adamw(Stage1Model(tiny_config), 1e-3, 1e-4, 0.05, 2, 10)["optimizer"].param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and [g["initial_lr"] for g in groups] == [1e-3, 1e-3]


def block_calls(model) -> list[int]:
    """Counts the first block's forward runs (a forward hook would miss checkpointing's recomputation)."""
    calls, block = [0], model.visual_encoder.model.blocks[0]
    forward = block.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    block.forward = counted
    return calls


def test_gradient_checkpointing_recomputes_the_encoders_blocks_with_identical_gradients(tiny_config):
    from test_shared_image_kv import batch
    from test_speed_options import step

    tiny_config.qformer_config.hidden_dropout_prob = 0.0
    tiny_config.qformer_config.attention_probs_dropout_prob = 0.0
    model = Stage1Model(tiny_config, train_vision=True).train()
    calls = block_calls(model)
    inputs = batch()
    _, plain = step(model, inputs)
    assert calls[0] == 1
    model.visual_encoder.use_gradient_checkpointing()
    _, checkpointed = step(model, inputs)
    assert calls[0] == 3  # forward, and again in the backward
    assert encoder_names(model) <= plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=lambda m: f"{name}: {m}")


# --- a fit under bf16-mixed, its checkpoint and its export ---------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stages.data.synthetic import make_dataset

    folder = tmp_path_factory.mktemp("train_vision_data")
    make_dataset(folder, num_images=20, seed=1)
    return folder


def encoder_file(folder: Path, seed: int = 5) -> Path:
    """A tiny encoder's weights in a file of their own, as a real run's (EVA ViT-g's) are."""
    from qformer.config import preset
    from qformer.folders import save_encoder_weights

    torch.manual_seed(seed)
    return save_encoder_weights(Stage1Model(preset("tiny")).visual_encoder.model.state_dict(), folder, "encoder.safetensors")


def model_config_file(folder: Path, precision: str) -> Path:
    from qformer.config import preset

    config = preset("tiny")
    config.vision_config.precision = precision
    config.save(folder / "tiny.json")
    return folder / "tiny.json"


def test_a_bf16_mixed_fit_trains_fp32_encoder_weights_that_checkpoint_and_export_carry(data, tmp_path):
    from qformer.files import read_safetensors
    from qformer.folders import ENCODER_FILE, read_config
    from stages.tools.export import export
    from stages.train.lightning_cli import run_training

    weights = encoder_file(tmp_path)
    argv = ["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "stage1" / "tiny.yaml"),
            "--model.config", str(model_config_file(tmp_path, "bf16")), "--model.tokenizer", str(data),
            "--model.vision_weights", str(weights), "--model.train_vision", "true", "--model.vision_lr_decay", "0.9",
            "--model.gradient_checkpointing", "true", "--model.warmup_steps", "1", "--model.val_retrieval", "off",
            "--data.train", str(data / "train.json"), "--data.val", "null", "--data.image_root", str(data), "--data.batch_size", "8",
            "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false"]
    cli = run_training("stage1", argv)
    encoder = cli.model.model.visual_encoder
    assert encoder.model.grad_checkpointing  # model.gradient_checkpointing covers the encoder's blocks
    trained = {k: v.detach() for k, v in encoder.model.state_dict().items()}
    assert {v.dtype for v in trained.values()} == {torch.float32}  # fp32 master weights although precision is bf16
    start = read_safetensors(weights)
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])  # it trained

    checkpoint = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=False)
    for name, value in trained.items():  # kept although the encoder has a file: that file is no longer its weights
        assert torch.equal(checkpoint["state_dict"]["model.visual_encoder.model." + name], value), name
    assert export(str(tmp_path / "run" / "last.ckpt"), out=str(tmp_path / "export")) == 0
    assert Path(read_config(tmp_path / "export").vision_config.weights_path).name == ENCODER_FILE
    exported = read_safetensors(tmp_path / "export" / ENCODER_FILE)
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], v) for k, v in trained.items())


def test_trained_encoder_weights_round_trip_through_transformers(data, tmp_path):
    import transformers

    from qformer.bert import load_tokenizer
    from qformer.config import preset
    from qformer.folders import load_stage1, save_stage1
    from qformer.interop.hf import export_hf, import_hf

    config = preset("tiny")
    config.vision_config.weights_path = str(encoder_file(tmp_path))
    tokenizer = load_tokenizer(data)
    config.qformer_config.vocab_size = len(tokenizer)
    model = Stage1Model(config, train_vision=True)
    with torch.no_grad():  # as a fine-tune leaves them: no longer the file's weights
        for p in model.visual_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained = {k: v.clone() for k, v in model.visual_encoder.model.state_dict().items()}
    save_stage1(model, tokenizer, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf"))
    torch.testing.assert_close(hf.vision_model.embeddings.position_embedding, trained["pos_embed"], rtol=0, atol=0)
    import_hf(tmp_path / "hf", tmp_path / "back")
    for folder in ("ours", "back"):
        loaded = load_stage1(tmp_path / folder)[0].visual_encoder.model.state_dict()
        for name, value in trained.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=lambda m: f"{folder} {name}: {m}")


def resume_fit(data: Path, root: Path, *extra: str):
    from stages.train.lightning_cli import run_training

    argv = ["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "stage1" / "tiny.yaml"),
            "--model.tokenizer", str(data), "--model.train_vision", "true", "--model.vision_lr_decay", "0.9",
            "--model.vision_weights", str(encoder_file(data)), "--model.val_retrieval", "off", "--model.warmup_steps", "1",
            "--data.train", str(data / "train.json"), "--data.val", "null", "--data.image_root", str(data), "--data.batch_size", "4",
            "--data.hflip", "true", "--trainer.max_steps", "5", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", *extra]
    return run_training("stage1", argv)


def test_a_killed_fit_that_trains_the_encoder_resumes_to_identical_weights(data, tmp_path):
    """As tests/test_resume.py, in-process: killed in step 4's backward (last.ckpt: step 2), `--ckpt_path last`, on to
    step 5 (past an epoch end: 4 batches an epoch) -> the weights, encoder included, and the optimizer state of an
    uninterrupted run."""
    from test_resume import final_weights

    from qformer.files import read_safetensors
    from stages.train.resume import find_checkpoint

    from resume_helpers import Killed, assert_same_training_state

    resume_fit(data, tmp_path / "whole")
    runs = tmp_path / "interrupted"
    with pytest.raises(Killed):
        resume_fit(data, runs, "--model.save_every_n_steps", "2",
                   "--trainer.callbacks", '[{"class_path": "resume_helpers.FailAt", "init_args": {"step": 3}}]')
    assert torch.load(find_checkpoint("last", runs), weights_only=False)["global_step"] == 2
    resume_fit(data, runs, "--ckpt_path", "last")

    expected, got = final_weights(tmp_path / "whole"), final_weights(runs)
    assert got["global_step"] == expected["global_step"] == 5
    qkv = "model.visual_encoder.model.blocks.0.attn.qkv.weight"
    assert not torch.equal(expected["state_dict"][qkv], read_safetensors(encoder_file(data))["blocks.0.attn.qkv.weight"])
    assert_same_training_state(expected, got)
