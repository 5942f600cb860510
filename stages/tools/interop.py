"""The commands that convert between our model folders and LAVIS / transformers (the work is `qformer.interop`)."""

from __future__ import annotations

import json


def _report(notes: list[str], done: str) -> int:
    for note in notes:
        print(f"note: {note}")
    print(done)
    return 0


def import_lavis(
    checkpoint: str,
    *,
    out: str,
    stage: int | None = None,
    vision_weights: str | None = None,
    lm: str | None = None,
    bert: str | None = None,
    vision_config: str | None = None,
    num_heads: int | None = None,
    overwrite: bool = False,
) -> int:
    """Convert a LAVIS blip2 / blip2_feature_extractor / blip2_opt / blip2_t5 .pth into an export folder.

    Args:
        checkpoint: the LAVIS .pth (loaded weights-only: pickled code is refused).
        out: the export folder to write.
        stage: check that the checkpoint is of this stage (1 or 2).
        vision_weights: image encoder weights (LAVIS's eva_vit_g.pth or timm format) when the checkpoint has none.
        lm: stage 2: local folder of the frozen LLM (OPT / FlanT5).
        bert: stage 1: local bert-base-uncased folder (tokenizer).
        vision_config: JSON VisionConfig fields, e.g. '{"model_name": "eva_giant_patch14_clip_224", "image_size": 364}'.
        num_heads: Q-Former attention heads (default: width / 64, as BERT).
        overwrite: replace an existing non-empty --out folder (as a whole, once the new one is complete).
    """
    from qformer.interop.lavis import import_lavis as convert

    if stage not in (None, 1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {stage}")
    try:
        fields = json.loads(vision_config) if vision_config else None
    except json.JSONDecodeError as error:
        raise ValueError(f"--vision-config is not JSON: {error}") from None
    notes = convert(checkpoint, out, stage, vision_weights, lm, bert, fields, num_heads, overwrite)
    return _report(notes, f"imported {checkpoint} into {out}")


def import_hf(folder: str, *, out: str, overwrite: bool = False) -> int:
    """Convert a transformers Blip2ForImageTextRetrieval / Blip2ForConditionalGeneration folder into an export folder.

    Args:
        folder: the transformers folder (config.json + safetensors).
        out: the export folder to write.
        overwrite: replace an existing non-empty --out folder (as a whole, once the new one is complete).
    """
    from qformer.interop.hf import import_hf as convert

    return _report(convert(folder, out, overwrite), f"imported {folder} into {out}")


def export_hf(folder: str, *, out: str, overwrite: bool = False) -> int:
    """Write a folder that transformers' Blip2 classes load with from_pretrained (with a Blip2Processor).

    Args:
        folder: our export folder (either stage).
        out: the transformers folder to write.
        overwrite: replace an existing non-empty --out folder (as a whole, once the new one is complete).
    """
    from qformer.interop.hf import export_hf as convert

    return _report(convert(folder, out, overwrite), f"wrote a transformers folder to {out}")
