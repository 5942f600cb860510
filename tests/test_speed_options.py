"""Options for big runs and bf16: gradient checkpointing gives identical gradients, torch.compile the same losses as
eager, the frozen towers follow a CPU bf16 autocast, and both stages train under --trainer.precision bf16-mixed."""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
from test_shared_image_kv import batch

from qformer.frozen import cpu_autocast_dtype
from qformer.losses import stage1_losses
from qformer.stage1 import Stage1Model

DEC = 1


def step(model, inputs, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = stage1_losses(model, *inputs, DEC)
    losses.total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return torch.stack([losses.itc, losses.itm, losses.itg]).detach(), grads


def test_gradient_checkpointing_gives_identical_gradients(tiny_config):
    """With dropout on: the recomputed forward must draw the same dropout masks."""
    model = Stage1Model(tiny_config).train()
    assert tiny_config.qformer_config.hidden_dropout_prob > 0
    inputs = batch()
    plain, plain_grads = step(model, inputs)
    model.qformer.gradient_checkpointing = True
    checkpointed, checkpointed_grads = step(model, inputs)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=lambda m: f"{name}: {m}")


# The four Q-Former passes of a stage-1 step (queries alone, text alone, queries + text for ITM, text after cached
# queries for ITG) are four graphs. What our code decides (no graph break, the padding shortcut switched off under
# compile, in-place ops that functionalise, the same gradients) is traced by dynamo and AOT autograd, which aot_eager
# runs in a few seconds. Inductor adds only PyTorch's own code generation: ~80 C++ kernels for the 4 forward and
# 4 backward graphs, built with g++ at ~1-3 s of CPU each (about 100 s of CPU on a cold cache), so it runs with -m slow.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_qformer_matches_eager(tiny_config, backend):
    tiny_config.qformer_config.hidden_dropout_prob = 0.0
    tiny_config.qformer_config.attention_probs_dropout_prob = 0.0
    model = Stage1Model(tiny_config).train()
    inputs = batch()
    eager, eager_grads = step(model, inputs)
    model.qformer.compile(backend=backend, fullgraph=True)  # fullgraph: a graph break fails the test
    compiled, compiled_grads = step(model, inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_frozen_towers_follow_a_cpu_bf16_autocast(tiny_config):
    assert cpu_autocast_dtype() == torch.float32
    tiny_config.vision_config.precision = "auto"
    model = Stage1Model(tiny_config)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_autocast_dtype() == torch.bfloat16
        model.encode_image(pixels)
    assert next(model.visual_encoder.model.parameters()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert cpu_autocast_dtype() == torch.float32  # only bf16 is native on CPUs


def test_a_frozen_tower_runs_in_the_precision_it_is_switched_to(tiny_config):
    tiny_config.vision_config.precision = "auto"
    encoder = Stage1Model(tiny_config).visual_encoder
    pixels = torch.randn(2, 3, 32, 32)
    reference = encoder(pixels)
    encoder.set_precision("bf16")  # the demo's SmolLM2 generates so on a CPU with native bf16
    switched = encoder(pixels)
    assert next(encoder.model.parameters()).dtype == torch.bfloat16 and encoder.weight_precision == "bf16"
    assert switched.dtype == torch.float32 and not torch.equal(switched, reference)  # computed in bf16, handed on in fp32
    torch.testing.assert_close(switched, reference, rtol=0.05, atol=0.05)
    encoder.set_precision("auto")
    encoder(pixels)
    assert next(encoder.model.parameters()).dtype == torch.float32 and encoder.weight_precision == "fp32"
    with pytest.raises(ValueError, match="precision must be auto, fp32, fp16 or bf16, got 'int8'"):
        encoder.set_precision("int8")


# --- both stages train under bf16-mixed on a CPU ------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stages.data.synthetic import make_dataset

    folder = tmp_path_factory.mktemp("bf16_data")
    make_dataset(folder, num_images=40, seed=2)
    return folder


def fit(stage: str, config: str, data, root, *options: str):
    from pathlib import Path

    from stages.train.lightning_cli import run_training

    argv = ["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / stage / config),
            "--data.train", str(data / "train.json"), "--data.val", str(data / "val.json"), "--data.image_root", str(data),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "24", "--trainer.log_every_n_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.precision", "bf16-mixed", "--data.batch_size", "8", *options]
    return run_training(stage, argv)


def logged(root, name: str) -> list[float]:
    with open(next(root.rglob("metrics.csv"))) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def assert_finite_and_decreasing(values: list[float]) -> None:
    assert len(values) >= 8 and all(math.isfinite(v) for v in values), values
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, values


def auto_precision_config(tmp_path):
    import dataclasses
    import json

    from qformer.config import preset

    config = preset("tiny")
    config.vision_config.precision = "auto"
    path = tmp_path / "tiny_auto.json"
    path.write_text(json.dumps(dataclasses.asdict(config)))
    return path


def test_stage1_trains_in_bf16_mixed_on_cpu(data, tmp_path):
    cli = fit("stage1", "tiny.yaml", data, tmp_path, "--model.tokenizer", str(data), "--model.lr", "1e-3",
              "--model.config", str(auto_precision_config(tmp_path)),
              "--model.warmup_steps", "2", "--model.val_retrieval", "off")
    assert_finite_and_decreasing(logged(tmp_path, "train/loss"))
    assert next(cli.model.model.visual_encoder.model.parameters()).dtype == torch.bfloat16  # precision auto follows
    assert cli.model.model.qformer.query_tokens.dtype == torch.float32  # trained weights keep fp32 master copies
    assert not cli.model.optimizers().optimizer.defaults["fused"]  # Lightning clips (tiny.yaml) only unfused ones


def test_stage2_trains_in_bf16_mixed_on_cpu(data, tmp_path):
    from qformer.bert import load_tokenizer
    from qformer.config import preset
    from qformer.folders import save_stage1

    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.vision_config.precision = "auto"
    config.qformer_config.vocab_size = len(tokenizer)
    export = save_stage1(Stage1Model(config), tokenizer, tmp_path / "stage1")
    cli = fit("stage2", "tiny.yaml", data, tmp_path / "runs", "--model.stage1", str(export),
              "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder"), "--model.lm_precision", "auto",
              "--model.lr", "1e-3", "--model.warmup_steps", "2", "--model.val_caption", "false")
    assert_finite_and_decreasing(logged(tmp_path / "runs", "train/loss_lm"))
    assert next(cli.model.model.language_model.model.parameters()).dtype == torch.bfloat16
    assert next(cli.model.model.visual_encoder.model.parameters()).dtype == torch.bfloat16


FREE_A_LARGE_BUFFER = """
import sys, torch
from stages.memory import keep_freed_memory
applied = keep_freed_memory()
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
buffer = torch.ones(96 * 2**20 // 4)  # 96 MiB: above glibc's largest mmap threshold
before = resident()
del buffer
print(applied, (before - resident()) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, on Linux")
@pytest.mark.parametrize("setting", ["keep", "default"])
def test_freed_large_buffers_stay_in_the_process_unless_opted_out(setting):
    """glibc unmaps a freed 96 MiB buffer at once (the next step faults its pages in again); with the freed memory
    kept, the process keeps it. QFORMER_GLIBC_MALLOC=default keeps glibc's behaviour."""
    env = {**os.environ, "QFORMER_GLIBC_MALLOC": setting}
    done = subprocess.run([sys.executable, "-c", FREE_A_LARGE_BUFFER], capture_output=True, text=True, env=env, check=True)
    applied, released_mib = done.stdout.split()
    if setting == "keep":
        assert applied == "True" and float(released_mib) < 8
    else:
        assert applied == "False" and float(released_mib) > 64
