"""Weight decay on weight matrices only; warmup then cosine per optimizer step."""

import math

import torch

from qformer.stage1 import Stage1Model
from stages.train.optim import configure_adamw, param_groups, warmup_cosine


def test_decay_only_on_weight_matrices(tiny_config):
    model = Stage1Model(tiny_config)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {"temp", "qformer.query_tokens", "ln_vision.weight", "vision_proj.bias", "lm_head.bias"} <= kept
    assert "qformer.layers.0.self_attn.norm.weight" in kept
    assert {"vision_proj.weight", "qformer.layers.0.cross_attn.key.weight", "itm_head.weight"} <= decayed
    assert not any(n.startswith("visual_encoder.") for n in decayed | kept)  # frozen: not optimised
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_warmup_then_cosine_to_min():
    assert warmup_cosine(0, 10, 110, 0.1) == 0.1
    assert warmup_cosine(9, 10, 110, 0.1) == 1.0
    assert math.isclose(warmup_cosine(60, 10, 110, 0.1), 0.55)
    assert math.isclose(warmup_cosine(110, 10, 110, 0.1), 0.1)
    assert math.isclose(warmup_cosine(500, 10, 110, 0.1), 0.1)


def test_scheduler_steps_per_optimizer_step(tiny_config):
    model = Stage1Model(tiny_config)
    setup = configure_adamw(model, lr=1e-3, min_lr=1e-4, weight_decay=0.05, warmup_steps=4, total_steps=20)
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert setup["lr_scheduler"]["interval"] == "step"
    assert optimizer.defaults["betas"] == (0.9, 0.98)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert math.isclose(optimizer.param_groups[0]["lr"], 1e-4, rel_tol=1e-6)


def test_adamw_is_fused_unless_told_otherwise():
    from stages.train.optim import configure_adamw

    module = torch.nn.Linear(4, 4)
    assert configure_adamw(module, 1e-3, 1e-4, 0.05, 1, 10)["optimizer"].defaults["fused"]
    assert not configure_adamw(module, 1e-3, 1e-4, 0.05, 1, 10, fused=False)["optimizer"].defaults["fused"]
