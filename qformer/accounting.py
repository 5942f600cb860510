"""Parameter accounting on the meta device: no memory, no weights, no download."""

from __future__ import annotations

import torch

from qformer.config import Blip2Config
from qformer.stage1 import Stage1Model


def stage1_parameter_counts(config: Blip2Config) -> dict[str, int]:
    """Trainable / frozen / total parameters of the stage-1 model, built on the meta device."""
    with torch.device("meta"):
        return _counts(Stage1Model(_without_weights(config)))


def _counts(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}


def _without_weights(config: Blip2Config) -> Blip2Config:
    data = config.to_dict()
    data["vision_config"]["weights_path"] = None  # shapes only: never read a weights file here
    return Blip2Config.from_dict(data)


def stage2_parameter_counts(config: Blip2Config) -> dict[str, int]:
    """Trainable / frozen / total parameters of the stage-2 model (the LM built from its config only)."""
    import transformers

    from qformer.stage2 import Stage2Model

    data = _without_weights(config).to_dict()
    lm = data["language_model"]
    lm["adapter"] = None  # a saved adapter's shapes are those of a new one with the same settings (`lora`)
    if lm["path"] is not None:  # its config.json, never its weights
        lm["config"], lm["path"] = transformers.AutoConfig.from_pretrained(lm["path"], local_files_only=True).to_dict(), None
    with torch.device("meta"):
        return _counts(Stage2Model(Blip2Config.from_dict(data)))
