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
from qformer.stage2 import Stage2Model

FORMAT = {"format": "qformer-export", "version": 1}
FROZEN_PREFIX = "visual_encoder."
LM_PREFIX = "language_model."
# Stage-1 weights that stage 2 does not use (the Q-Former's text side and the stage-1 heads).
STAGE1_ONLY = ("qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings.", "vision_proj.", "text_proj.", "itm_head.", "lm_head.", "temp")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    frozen = (FROZEN_PREFIX, LM_PREFIX)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(frozen)}


ENCODER_FILE = "visual_encoder.safetensors"


def save_encoder_weights(state: dict[str, torch.Tensor], out: Path, name: str = ENCODER_FILE) -> Path:
    """Frozen-encoder weights (timm names) as `out/name`: by default the file an export folder carries."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / name))
    return out / name


def _save_common(model, out: Path, stage: int) -> Blip2Config:
    """Trainable weights, and the frozen encoder too when it has no file of its own; returns the config to write."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(out / "model.safetensors"))
    config = Blip2Config.from_dict(model.config.to_dict())
    weights = config.vision_config.weights_path
    if weights is not None and Path(weights).name != ENCODER_FILE:
        config.vision_config.weights_path = str(Path(weights).resolve())  # the export may be read from elsewhere
    else:
        # A randomly initialised encoder has no file of its own (or only one inside another export): it travels along.
        save_encoder_weights(model.visual_encoder.model.state_dict(), out)
        config.vision_config.weights_path = ENCODER_FILE
    (out / "qformer_export.json").write_text(json.dumps({**FORMAT, "stage": stage}, indent=2) + "\n")
    return config


def save_stage1(model: Stage1Model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    config = _save_common(model, out, stage=1)
    config.save(out / "config.json")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return out


def save_stage2(model: Stage2Model, lm_tokenizer, out_dir: str | Path) -> Path:
    """The LM is recorded by path; one built from a config (no folder) is saved into the export."""
    out = Path(out_dir)
    config = _save_common(model, out, stage=2)
    lm = config.language_model
    if lm.path is not None:
        lm.path = str(Path(lm.path).resolve())
    else:
        model.language_model.model.save_pretrained(str(out / "language_model"))
        lm.path, lm.config = "language_model", None
    lm_tokenizer.save_pretrained(str(out / "lm_tokenizer"))
    lm.tokenizer = "lm_tokenizer"
    config.save(out / "config.json")
    return out


def read_export_info(folder: str | Path) -> dict:
    info_file = Path(folder) / "qformer_export.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{folder} is not a qformer export folder (no qformer_export.json)")
    info = json.loads(info_file.read_text())
    if info.get("format") != FORMAT["format"]:
        raise ValueError(f"{info_file}: unknown format {info.get('format')!r}")
    return info


def read_config(folder: str | Path) -> Blip2Config:
    """The export's config; relative weight and tokenizer paths are relative to the folder."""
    folder = Path(folder)
    config = Blip2Config.from_file(folder / "config.json")
    config.vision_config.weights_path = _relative_to(folder, config.vision_config.weights_path)
    if config.language_model is not None:
        config.language_model.path = _relative_to(folder, config.language_model.path)
        config.language_model.tokenizer = _relative_to(folder, config.language_model.tokenizer)
    return config


def _relative_to(folder: Path, path: str | None) -> str | None:
    return path if path is None or Path(path).is_absolute() else str(folder / path)


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


def load_stage2(folder: str | Path, map_location: str = "cpu") -> tuple[Stage2Model, object]:
    """(model in eval mode, the LM's tokenizer) from a stage-2 export folder."""
    from qformer.stage2 import load_lm_tokenizer

    folder = Path(folder)
    info = read_export_info(folder)
    if info.get("stage") != 2:
        raise ValueError(f"{folder} holds a stage-{info.get('stage')} model, not stage 2")
    config = read_config(folder)
    model = Stage2Model(config)
    load_strict(model, load_file(str(folder / "model.safetensors"), device=map_location), str(folder), (FROZEN_PREFIX, LM_PREFIX))
    return model.eval(), load_lm_tokenizer(config.language_model)


def load_model(folder: str | Path):
    """Either stage's export: (model, tokenizer, stage)."""
    stage = read_export_info(folder).get("stage")
    model, tokenizer = load_stage1(folder) if stage == 1 else load_stage2(folder)
    return model, tokenizer, stage


def load_stage1_into_stage2(model: Stage2Model, folder: str | Path) -> list[str]:
    """Stage 2 starts from the stage-1 Q-Former: strict, except the stage-1-only parts, which are returned."""
    folder = Path(folder)
    if read_export_info(folder).get("stage") != 1:
        raise ValueError(f"model.stage1: {folder} is not a stage-1 export")
    state = load_file(str(folder / "model.safetensors"))
    unused = sorted(k for k in state if k.startswith(STAGE1_ONLY) or ".text_ffn." in k)
    kept = {k: v for k, v in state.items() if k not in unused}
    load_strict(model, kept, str(folder), (FROZEN_PREFIX, LM_PREFIX, "language_projection."))
    return unused


def load_strict(model: torch.nn.Module, state: dict, source: str, may_miss: tuple[str, ...] = (FROZEN_PREFIX,)) -> None:
    """load_state_dict that fails on any unexpected key and on missing keys outside `may_miss`."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(may_miss)]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
