"""Salesforce LAVIS checkpoints -> our export folders.

* `import_lavis`: a LAVIS `blip2` / `blip2_feature_extractor` (stage 1), `blip2_opt` or `blip2_t5` (stage 2), or
  `blip2_t5_instruct` / `blip2_vicuna_instruct` (InstructBLIP: an instruction-aware stage 2, recognised by the
  Q-Former's text feed-forward weights, which BLIP-2's stage 2 drops) checkpoint -> our export folder. LAVIS's EVA ViT-g uses timm's parameter names, so its weights (inside the
  checkpoint or LAVIS's `eva_vit_g.pth`) load into timm's `eva_giant_patch14_clip_224` as they are; timm's own
  checkpoint filter resamples `pos_embed` when the image size differs.

Every conversion is strict (see `qformer.interop.names`) and reports what it leaves out or initialises. Every output
folder is written whole or not at all (`qformer.files.atomic_folder`); a non-empty one is replaced only with
`overwrite=True`.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from qformer.config import LanguageModelConfig, QFormerConfig, VisionConfig, preset
from qformer.files import atomic_folder, check_out
from qformer.folders import load_strict, save_encoder_weights, write_stage1, write_stage2
from qformer.interop.names import from_lavis
from qformer.stage1 import Stage1Model
from qformer.stage2 import Stage2Model
from qformer.vision import load_state_dict_file


LAVIS_PROJECTIONS = ("opt_proj", "t5_proj", "llm_proj")  # blip2_opt, blip2_t5 / blip2_t5_instruct, blip2_vicuna_instruct
INSTRUCT_MARK = "Qformer.bert.encoder.layer.0.intermediate.dense.weight"  # a text FFN: only InstructBLIP's stage 2 keeps it


# --- reading checkpoints ---------------------------------------------------------------------------------
def read_torch_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A `.pth` state dict, loaded with `weights_only=True`: a pickle with other objects is refused."""
    return load_state_dict_file(path)


# --- LAVIS ------------------------------------------------------------------------------------------------
def _qformer_config_from_lavis(state: dict[str, Tensor]) -> tuple[QFormerConfig, int, int]:
    """Q-Former dimensions read off the weights; heads follow BERT's 64-wide convention."""
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.", k))})
    if "query_tokens" not in state or not layers:
        raise ValueError("not a BLIP-2 checkpoint: no query_tokens / Qformer.bert.encoder.layer.* keys")
    cross = [i for i in layers if f"Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight" in state]
    _, num_queries, hidden = state["query_tokens"].shape
    prefix = "Qformer.bert.encoder.layer.0."
    config = QFormerConfig(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=state[prefix + "intermediate_query.dense.weight"].shape[0],
        cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else len(layers),
        encoder_hidden_size=state[prefix + "crossattention.self.key.weight"].shape[1],
    )
    words = state.get("Qformer.bert.embeddings.word_embeddings.weight")
    if words is not None:
        config.vocab_size = words.shape[0]
        config.max_position_embeddings = state["Qformer.bert.embeddings.position_embeddings.weight"].shape[0]
    projection = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256
    return config, num_queries, projection


def import_lavis(
    checkpoint: str | Path,
    out: str | Path,
    stage: int | None = None,
    vision_weights: str | None = None,
    lm: str | None = None,
    bert: str | None = None,
    vision_config: dict | None = None,
    num_attention_heads: int | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Convert a LAVIS BLIP-2 checkpoint into an export folder; returns notes on what was left out."""
    from qformer.bert import load_tokenizer
    from qformer.language_model import load_lm_tokenizer

    check_out(out, overwrite)  # before reading gigabytes
    state = read_torch_checkpoint(checkpoint)
    projection = next((name for name in LAVIS_PROJECTIONS if f"{name}.weight" in state), None)
    found_stage = 2 if projection else 1
    instruct = found_stage == 2 and INSTRUCT_MARK in state
    if stage is not None and stage != found_stage:
        raise ValueError(f"{checkpoint}: --stage {stage} asked, but the checkpoint is a stage-{found_stage} model")
    qc, num_queries, projection_size = _qformer_config_from_lavis(state)
    if num_attention_heads is not None:
        qc.num_attention_heads = num_attention_heads
    config = preset("vitg")
    config.qformer_config, config.num_query_tokens, config.image_text_hidden_size = qc, num_queries, projection_size
    config.vision_config = VisionConfig(**{**config.vision_config.__dict__, **(vision_config or {})})
    encoder = {k[len("visual_encoder.") :]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    state = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    if vision_weights is None and not encoder:
        raise ValueError(f"{checkpoint} holds no visual_encoder.* weights: give --vision-weights (e.g. LAVIS's eva_vit_g.pth)")
    if found_stage == 1 and bert is None:
        raise ValueError("stage-1 import needs --bert DIR, a local bert-base-uncased folder for the tokenizer")
    if found_stage == 2 and lm is None:
        raise ValueError("stage-2 import needs --lm DIR, the local folder of the frozen LLM (OPT / FlanT5 / Vicuna)")
    if instruct and bert is None:
        raise ValueError("an InstructBLIP checkpoint needs --bert DIR too, a local bert-base-uncased folder for the Q-Former's tokenizer")

    notes = []
    with atomic_folder(out, overwrite) as folder:
        if vision_weights is not None:
            config.vision_config.weights_path = str(Path(vision_weights).resolve())
        else:  # the encoder needs a file to be built from: the one the export will carry
            config.vision_config.weights_path = str(save_encoder_weights(encoder, folder))
            notes.append(f"image encoder weights taken from the checkpoint ({len(encoder)} tensors)")
        if found_stage == 1:
            model = Stage1Model(config)
            tokenizer = load_tokenizer(bert)
        else:
            config.language_model = LanguageModelConfig(path=str(Path(lm).resolve()))
            config.qformer_text_input = instruct
            model = Stage2Model(config)
            tokenizer = load_lm_tokenizer(config.language_model)
            if instruct:
                model.instruction_tokenizer = load_tokenizer(bert)
                notes.append("InstructBLIP: an instruction-aware Q-Former (qformer_text_input), its tokenizer from --bert")
        ours, dropped = from_lavis(state, list(model.state_dict()), projection)
        load_strict(model, ours, str(checkpoint), ("visual_encoder.", "language_model."))
        notes += [f"dropped (documented): {k}" for k in dropped]
        write = write_stage1 if found_stage == 1 else write_stage2
        write(model, tokenizer, folder, Path(out), str(checkpoint))
    return notes
