"""Self-describing model folders: trainable weights (safetensors), the config and the tokenizer.

The frozen image encoder is not copied: the config records its timm name and weights file, and
loading rebuilds it from there. Loading is strict: only the encoder's keys may be absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qformer.config import Blip2Config
from qformer.stage1 import Stage1Model

FORMAT = {"format": "qformer-export", "version": 1}
FROZEN_PREFIX = "visual_encoder."


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIX)}


ENCODER_FILE = "visual_encoder.safetensors"


def save_stage1(model: Stage1Model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(out / "model.safetensors"))
    config = Blip2Config.from_dict(model.config.to_dict())
    if config.vision_config.weights_path is None:
        # A randomly initialised encoder has no file to be rebuilt from: it travels with the export.
        encoder = {k: v.contiguous() for k, v in model.visual_encoder.model.state_dict().items()}
        save_file(encoder, str(out / ENCODER_FILE))
        config.vision_config.weights_path = ENCODER_FILE
    config.save(out / "config.json")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "qformer_export.json").write_text(json.dumps({**FORMAT, "stage": 1}, indent=2) + "\n")
    return out


def read_export_info(folder: str | Path) -> dict:
    info_file = Path(folder) / "qformer_export.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{folder} is not a qformer export folder (no qformer_export.json)")
    info = json.loads(info_file.read_text())
    if info.get("format") != FORMAT["format"]:
        raise ValueError(f"{info_file}: unknown format {info.get('format')!r}")
    return info


def read_config(folder: Path) -> Blip2Config:
    """The export's config; a relative encoder weights path is relative to the folder."""
    config = Blip2Config.from_file(folder / "config.json")
    weights = config.vision_config.weights_path
    if weights is not None and not Path(weights).is_absolute():
        config.vision_config.weights_path = str(folder / weights)
    return config


def load_stage1(folder: str | Path, map_location: str = "cpu") -> tuple[Stage1Model, object]:
    """(model in eval mode, tokenizer) from a stage-1 export folder."""
    from qformer.bert import load_tokenizer

    folder = Path(folder)
    info = read_export_info(folder)
    if info.get("stage") != 1:
        raise ValueError(f"{folder} holds a stage-{info.get('stage')} model, not stage 1")
    model = Stage1Model(read_config(folder))
    load_strict(model, load_file(str(folder / "model.safetensors"), device=map_location), str(folder))
    return model.eval(), load_tokenizer(folder / "tokenizer")


def load_strict(model: torch.nn.Module, state: dict, source: str, may_miss: tuple[str, ...] = (FROZEN_PREFIX,)) -> None:
    """load_state_dict that fails on any unexpected key and on missing keys outside `may_miss`."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(may_miss)]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
