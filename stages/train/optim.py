"""Optimiser and schedule shared by both stages: AdamW with decoupled decay on weight matrices, warmup + cosine."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

NO_DECAY_NAMES = ("query_tokens", "temp")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weight matrices only; biases, norms, `temp` and `query_tokens` are not decayed."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 2 and not name.endswith(NO_DECAY_NAMES):
            decay.append(param)
        else:
            no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | Callable[[], int], min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1, then cosine from 1 to `min_ratio` at `total_steps`.

    `total_steps` may be a function, asked only once the cosine has begun: Lightning's estimate of a run's steps
    builds the training data loader, which must not happen before a resumed run's data position is restored.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step == warmup_steps:
        return 1.0  # the top of the cosine, whatever the run's length
    if callable(total_steps):
        total_steps = total_steps()
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def configure_adamw(
    module: nn.Module,
    lr: float,
    min_lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int | Callable[[], int],
    betas: tuple[float, float] = (0.9, 0.98),
    fused: bool = True,
) -> dict:
    """The `configure_optimizers` answer for Lightning: AdamW + a schedule stepped every optimizer step.

    The fused AdamW kernel (CUDA and CPU) updates every parameter in one pass: on a 2-core CPU it takes 0.10 s
    instead of the default's 0.60 s for stage 1's 187M trainable parameters. `fused=False` keeps torch's default.
    """
    groups = param_groups(module, weight_decay)
    fusable = fused and all(p.device.type in ("cuda", "cpu") for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if fusable else None)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr / lr)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
