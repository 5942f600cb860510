"""Self-describing model folders: trainable weights (safetensors), the config and the tokenizer (stage 2 with LoRA:
the LM's adapter too, in PEFT's layout in `lm_adapter/`).

The frozen image encoder is not copied: the config records its timm name and weights file, and
loading rebuilds it from there. Loading is strict: only the encoder's keys may be absent.
A folder is written whole or not at all (`qformer.files.atomic_folder`); `qformer_export.json` is written last. A
stage-1 export's marker also records the sha256 of its weights as loaded (`weights_record`), so that `qformer index`,
`search` and `serve` need not hash the model on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qformer.config import Blip2Config
from qformer.files import MARKER, atomic_folder, non_finite, read_safetensors, shape_mismatches, weights_sha256, write_safetensors
from qformer.lora import ADAPTER_FOLDER
from qformer.stage1 import Stage1Model
from qformer.stage2 import Stage2Model

FORMAT = {"format": "qformer-export", "version": 1}
FROZEN_PREFIX = "visual_encoder."
LM_PREFIX = "language_model."
# Stage-1 weights that stage 2 does not use: the stage-1 heads, and the Q-Former's text side unless the stage-2 model is
# instruction-aware (`qformer_text_input`: the instruction's tokens need the word/position embeddings and text FFNs).
STAGE1_HEADS = ("vision_proj.", "text_proj.", "itm_head.", "lm_head.", "temp")
TEXT_EMBEDDINGS = ("qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings.")
STAGE1_ONLY = TEXT_EMBEDDINGS + STAGE1_HEADS


def is_text_weight(key: str) -> bool:
    """The Q-Former's text side: word/position embeddings and every layer's text feed-forward."""
    return key.startswith(TEXT_EMBEDDINGS) or ".text_ffn." in key


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    frozen = (FROZEN_PREFIX, LM_PREFIX)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(frozen)}


ENCODER_FILE = "visual_encoder.safetensors"


def save_encoder_weights(state: dict[str, torch.Tensor], out: Path, name: str = ENCODER_FILE) -> Path:
    """Frozen-encoder weights (timm names) as `out/name`: by default the file an export folder carries."""
    out.mkdir(parents=True, exist_ok=True)
    return write_safetensors(state, out / name)


def require_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """An export of NaN/inf weights would load and then produce garbage: refuse it, naming the tensors."""
    bad = non_finite(state)
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(f"{source}: {len(bad)} tensor(s) hold NaN or inf values ({shown}); nothing exported")


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def _write_common(model, folder: Path, dest: Path, source: str) -> Blip2Config:
    """Trainable weights, and the image encoder too when it was trained or has no file of its own; returns the config
    to write.

    `folder` is the temporary folder being written, `dest` the folder it will become.
    """
    state = trainable_state(model)
    require_finite(state, source)
    config = Blip2Config.from_dict(model.config.to_dict())
    weights = config.vision_config.weights_path
    trained = model.visual_encoder.trainable  # its weights are no longer those of its file
    if weights is not None and not trained and Path(weights).name != ENCODER_FILE and not _inside(weights, dest):
        config.vision_config.weights_path = str(Path(weights).resolve())  # the export may be read from elsewhere
    else:
        # A trained or randomly initialised encoder has no file of its own (or only one inside an export, maybe the
        # one this folder replaces): it travels along, in fp32 when trained.
        encoder = model.visual_encoder.model.state_dict()
        require_finite(encoder, source)
        save_encoder_weights(encoder, folder)
        config.vision_config.weights_path = ENCODER_FILE
    write_safetensors(state, folder / "model.safetensors")
    return config


def _write_marker(folder: Path, stage: int) -> None:
    """Last: a folder with the marker is a complete export (a stage-1 one with the hash of its weights)."""
    weights = weights_record(folder) if stage == 1 else {}
    (folder / MARKER).write_text(json.dumps({**FORMAT, "stage": stage, **weights}, indent=2) + "\n")


# --- the weights' hash, computed once -----------------------------------------------------------------------
# An index (`qformer index`) records the sha256 of the stage-1 weights it was built with, frozen encoder included,
# and every search checks it. Hashing ViT-g takes seconds, so the export records the hash when it is written,
# with the size and modification time of the files it covers: a file changed since then makes it hash again.
def _file_stamp(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def weights_record(folder: Path) -> dict:
    """{"weights_sha256", "weights_files"} of the stage-1 export files in `folder`, hashed as `load_stage1` loads them
    (what the model in memory holds may differ: "auto" precision casts the encoder on its first forward)."""
    config = read_config(folder)
    covered = [folder / "config.json", folder / "model.safetensors", Path(config.vision_config.weights_path)]
    files = {_name_in(path, folder): _file_stamp(path) for path in covered}
    return {"weights_sha256": weights_sha256(_stage1_from_files(folder)), "weights_files": files}


def _name_in(path: Path, folder: Path) -> str:
    """Relative to the export when inside it (the folder may move), else absolute."""
    return path.resolve().relative_to(folder.resolve()).as_posix() if _inside(str(path), folder) else str(path.resolve())


def recorded_weights_sha256(folder: str | Path) -> str | None:
    """The weights' sha256 the export recorded, or None: written before exports recorded it, or a file changed since."""
    info = read_export_info(folder)
    sha, files = info.get("weights_sha256"), info.get("weights_files")
    if not isinstance(sha, str) or not isinstance(files, dict) or not files:
        return None
    unchanged = all(_file_stamp(Path(folder) / name) == stamp for name, stamp in files.items())
    return sha if unchanged else None


def write_stage1(model: Stage1Model, tokenizer, folder: Path, dest: Path, source: str = "the model") -> None:
    """The files of a stage-1 export, into the (temporary) `folder` that becomes `dest`."""
    config = _write_common(model, folder, dest, source)
    config.save(folder / "config.json")
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    _write_marker(folder, 1)


def write_stage2(model: Stage2Model, lm_tokenizer, folder: Path, dest: Path, source: str = "the model") -> None:
    """The LM is recorded by path; one built from a config (no folder), or inside `dest`, is saved into the export."""
    config = _write_common(model, folder, dest, source)
    lm = config.language_model
    if lm.path is not None and _inside(lm.path, folder):  # already written here (import hf)
        lm.path = Path(lm.path).resolve().relative_to(folder.resolve()).as_posix()
    elif lm.path is not None and not _inside(lm.path, dest):
        lm.path = str(Path(lm.path).resolve())
    else:
        model.language_model.save_language_model(folder / "language_model")
        lm.path, lm.config = "language_model", None
    if model.language_model.has_adapter:  # LoRA: the adapter in PEFT's layout, applied when the export loads
        model.language_model.save_adapter(folder / ADAPTER_FOLDER)
        lm.adapter = ADAPTER_FOLDER
    lm_tokenizer.save_pretrained(str(folder / "lm_tokenizer"))
    lm.tokenizer = "lm_tokenizer"
    if config.qformer_text_input:  # the Q-Former's tokenizer travels along, as in a stage-1 export
        if model.instruction_tokenizer is None:
            raise ValueError(f"{source}: an instruction-aware model needs its Q-Former's tokenizer (model.instruction_tokenizer) to be exported")
        model.instruction_tokenizer.save_pretrained(str(folder / "tokenizer"))
    config.save(folder / "config.json")
    _write_marker(folder, 2)


def save_stage1(model: Stage1Model, tokenizer, out_dir: str | Path, overwrite: bool = False, source: str = "the model") -> Path:
    """A stage-1 export folder; an existing non-empty `out_dir` only with `overwrite` (replaced as a whole)."""
    with atomic_folder(out_dir, overwrite) as folder:
        write_stage1(model, tokenizer, folder, Path(out_dir), source)
    return Path(out_dir)


def save_stage2(model: Stage2Model, lm_tokenizer, out_dir: str | Path, overwrite: bool = False, source: str = "the model") -> Path:
    """A stage-2 export folder; an existing non-empty `out_dir` only with `overwrite` (replaced as a whole)."""
    with atomic_folder(out_dir, overwrite) as folder:
        write_stage2(model, lm_tokenizer, folder, Path(out_dir), source)
    return Path(out_dir)


def read_export_info(folder: str | Path) -> dict:
    info_file = Path(folder) / MARKER
    if not info_file.is_file():
        raise FileNotFoundError(f"{folder} is not a qformer export folder (no {MARKER})")
    try:
        info = json.loads(info_file.read_text())
    except ValueError as error:
        raise ValueError(f"{info_file} is not valid JSON ({error})") from error
    found = info.get("format") if isinstance(info, dict) else info
    if found != FORMAT["format"]:
        raise ValueError(f"{info_file}: unknown format {found!r}")
    return info


def read_config(folder: str | Path) -> Blip2Config:
    """The export's config; relative weight and tokenizer paths are relative to the folder."""
    folder = Path(folder)
    config = Blip2Config.from_file(folder / "config.json")
    config.vision_config.weights_path = _relative_to(folder, config.vision_config.weights_path)
    if config.language_model is not None:
        config.language_model.path = _relative_to(folder, config.language_model.path)
        config.language_model.tokenizer = _relative_to(folder, config.language_model.tokenizer)
        config.language_model.adapter = _relative_to(folder, config.language_model.adapter)
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
    return _stage1_from_files(folder, map_location), load_tokenizer(folder / "tokenizer")


def _stage1_from_files(folder: Path, map_location: str = "cpu") -> Stage1Model:
    model = Stage1Model(read_config(folder))
    load_strict(model, read_safetensors(folder / "model.safetensors", device=map_location), str(folder))
    return model.eval()


def load_stage2(folder: str | Path, map_location: str = "cpu") -> tuple[Stage2Model, object]:
    """(model in eval mode, the LM's tokenizer) from a stage-2 export folder."""
    from qformer.language_model import load_lm_tokenizer

    folder = Path(folder)
    info = read_export_info(folder)
    if info.get("stage") != 2:
        raise ValueError(f"{folder} holds a stage-{info.get('stage')} model, not stage 2")
    config = read_config(folder)
    model = Stage2Model(config)
    load_strict(model, read_safetensors(folder / "model.safetensors", device=map_location), str(folder), (FROZEN_PREFIX, LM_PREFIX))
    if config.qformer_text_input:
        from qformer.bert import load_tokenizer

        model.instruction_tokenizer = load_tokenizer(folder / "tokenizer")
    return model.eval(), load_lm_tokenizer(config.language_model)


def load_model(folder: str | Path):
    """Either stage's export: (model, tokenizer, stage)."""
    stage = read_export_info(folder).get("stage")
    model, tokenizer = load_stage1(folder) if stage == 1 else load_stage2(folder)
    return model, tokenizer, stage


def load_stage1_into_stage2(model: Stage2Model, folder: str | Path) -> list[str]:
    """Stage 2 starts from the stage-1 Q-Former: strict, except the stage-1-only parts, which are returned.

    An instruction-aware model keeps the Q-Former's text side too (InstructBLIP keeps what BLIP-2's stage 2 drops).
    """
    folder = Path(folder)
    if read_export_info(folder).get("stage") != 1:
        raise ValueError(f"model.stage1: {folder} is not a stage-1 export")
    state = read_safetensors(folder / "model.safetensors")
    drop_text = not model.config.qformer_text_input
    unused = sorted(k for k in state if k.startswith(STAGE1_HEADS) or (drop_text and is_text_weight(k)))
    kept = {k: v for k, v in state.items() if k not in unused}
    load_strict(model, kept, str(folder), (FROZEN_PREFIX, LM_PREFIX, "language_projection."))
    return unused


def load_text_weights(model: Stage2Model, folder: str | Path) -> None:
    """An instruction-aware model started from a plain stage-2 export takes the Q-Former's text side (word/position
    embeddings, text FFNs), which BLIP-2's stage 2 drops, from the stage-1 export that stage 2 started from."""
    folder = Path(folder)
    if read_export_info(folder).get("stage") != 1:
        raise ValueError(f"model.stage1: {folder} is not a stage-1 export")
    text = {k: v for k, v in read_safetensors(folder / "model.safetensors").items() if is_text_weight(k)}
    wanted = {k for k in model.state_dict() if is_text_weight(k)}
    if set(text) != wanted:
        raise ValueError(f"model.stage1: {folder} lacks the Q-Former's text weights {sorted(wanted - set(text))[:3]}")
    load_strict(model, text, str(folder), tuple(k for k in model.state_dict() if not is_text_weight(k)))


def load_strict(model: torch.nn.Module, state: dict, source: str, may_miss: tuple[str, ...] = (FROZEN_PREFIX,)) -> None:
    """load_state_dict that fails on a tensor of another shape, any unexpected key and missing keys outside `may_miss`."""
    wrong = shape_mismatches(model.state_dict(), state)
    if wrong:
        raise ValueError(f"{source}: {len(wrong)} tensor(s) do not fit the model: {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(may_miss)]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
