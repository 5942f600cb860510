"""Bridges to the two ecosystems BLIP-2 checkpoints live in: Salesforce LAVIS and transformers.

* `import_lavis`: a LAVIS `blip2` / `blip2_feature_extractor` (stage 1), `blip2_opt` or `blip2_t5` (stage 2)
  checkpoint -> our export folder. LAVIS's EVA ViT-g uses timm's parameter names, so its weights (inside the
  checkpoint or LAVIS's `eva_vit_g.pth`) load into timm's `eva_giant_patch14_clip_224` as they are; timm's own
  checkpoint filter resamples `pos_embed` when the image size differs.
* `import_hf`: a transformers `Blip2ForImageTextRetrieval` / `Blip2ForConditionalGeneration` folder -> our export.
* `export_hf`: our export -> a folder those two transformers classes load with `from_pretrained`, with a processor.

Every conversion is strict (see `qformer.convert`) and reports what it leaves out or initialises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from qformer.config import Blip2Config, LanguageModelConfig, QFormerConfig, VisionConfig, preset
from qformer.convert import from_lavis, stage1_from_hf, stage2_key_to_hf, to_hf_generation, to_hf_retrieval, vision_from_hf
from qformer.export import load_model, load_strict, save_encoder_weights, save_stage1, save_stage2
from qformer.stage1 import Stage1Model
from qformer.stage2 import Stage2Model
from qformer.vision import load_state_dict_file

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TOKEN = "<image>"


# --- reading checkpoints ---------------------------------------------------------------------------------
def read_torch_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A `.pth` state dict, loaded with `weights_only=True`: a pickle with other objects is refused."""
    return load_state_dict_file(path)


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise FileNotFoundError(f"no model.safetensors (or sharded index) in {folder}")


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
) -> list[str]:
    """Convert a LAVIS BLIP-2 checkpoint into an export folder; returns notes on what was left out."""
    from qformer.bert import load_tokenizer
    from qformer.stage2 import load_lm_tokenizer

    state = read_torch_checkpoint(checkpoint)
    projection = "opt_proj" if "opt_proj.weight" in state else "t5_proj" if "t5_proj.weight" in state else None
    found_stage = 2 if projection else 1
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
    notes = []
    if vision_weights is not None:
        config.vision_config.weights_path = str(Path(vision_weights).resolve())
    elif encoder:
        config.vision_config.weights_path = str(save_encoder_weights(encoder, Path(out)).resolve())
        notes.append(f"image encoder weights taken from the checkpoint ({len(encoder)} tensors)")
    else:
        raise ValueError(f"{checkpoint} holds no visual_encoder.* weights: give --vision-weights (e.g. LAVIS's eva_vit_g.pth)")

    if found_stage == 1:
        if bert is None:
            raise ValueError("stage-1 import needs --bert DIR, a local bert-base-uncased folder for the tokenizer")
        model = Stage1Model(config)
        tokenizer = load_tokenizer(bert)
    else:
        if lm is None:
            raise ValueError("stage-2 import needs --lm DIR, the local folder of the frozen LLM (OPT / FlanT5)")
        config.language_model = LanguageModelConfig(path=str(Path(lm).resolve()))
        model = Stage2Model(config)
        tokenizer = load_lm_tokenizer(config.language_model)
    ours, dropped = from_lavis(state, list(model.state_dict()), projection)
    load_strict(model, ours, str(checkpoint), ("visual_encoder.", "language_model."))
    notes += [f"dropped (documented): {k}" for k in dropped]
    if found_stage == 1:
        save_stage1(model, tokenizer, out)
    else:
        save_stage2(model, tokenizer, out)
    return notes


# --- transformers -------------------------------------------------------------------------------------------
def _vision_config_from_hf(vision: dict) -> tuple[VisionConfig, bool]:
    """timm equivalent of a `Blip2VisionModel`: EVA ViT-g for the paper's tower, a plain timm ViT otherwise."""
    eps = vision.get("layer_norm_eps", 1e-6)
    if vision["hidden_size"] == 1408 and vision["num_hidden_layers"] == 39:
        return VisionConfig(model_name="eva_giant_patch14_clip_224", image_size=vision["image_size"], ln_vision_eps=eps), True
    kwargs = {
        "embed_dim": vision["hidden_size"],
        "depth": vision["num_hidden_layers"] + 1,  # one block more, dropped again: the features stay un-normed
        "num_heads": vision["num_attention_heads"],
        "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"],
        "patch_size": vision["patch_size"],
    }
    config = VisionConfig(model_name="vit_base_patch16_224", image_size=vision["image_size"], precision="auto",
                          model_kwargs=kwargs, ln_vision_eps=eps)
    return config, False


def import_hf(folder: str | Path, out: str | Path) -> list[str]:
    """A transformers BLIP-2 folder (safetensors) -> our export; returns what was initialised or left out."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    hf_config = json.loads((folder / "config.json").read_text())
    architecture = (hf_config.get("architectures") or [""])[0]
    if architecture not in ("Blip2ForImageTextRetrieval", "Blip2ForConditionalGeneration"):
        raise ValueError(f"{folder}: a {architecture or 'non-BLIP-2'} model; expected Blip2ForImageTextRetrieval or Blip2ForConditionalGeneration")
    hf = read_hf_weights(folder)
    qf = hf_config["qformer_config"]
    config = Blip2Config(
        qformer_config=QFormerConfig(**{k: qf[k] for k in QFormerConfig.__dataclass_fields__ if k in qf}),
        num_query_tokens=hf_config.get("num_query_tokens", 32),
        image_text_hidden_size=hf_config.get("image_text_hidden_size", 256),
    )
    config.vision_config, eva = _vision_config_from_hf(hf_config["vision_config"])
    vision_state = vision_from_hf({k[len("vision_model.") :]: v for k, v in hf.items() if k.startswith("vision_model.") and "post_layernorm" not in k}, eva)
    out = Path(out)
    config.vision_config.weights_path = str(save_encoder_weights(vision_state, out).resolve())
    notes = [f"image encoder: timm {config.vision_config.model_name} with transformers' weights"]

    if architecture == "Blip2ForImageTextRetrieval":
        from qformer.bert import load_tokenizer

        model = Stage1Model(config)
        keys = list(model.state_dict())
        state, not_filled = stage1_from_hf(hf, keys, eva)
        load_strict(model, state, str(folder), ("visual_encoder.", "temp", "lm_head."))
        notes += [f"initialised (transformers has no counterpart): {k}" for k in not_filled]
        save_stage1(model, load_tokenizer(folder), out)
        return notes

    # stage 2: the LM's weights come with the checkpoint; they become a local LM folder of the export
    text_config = transformers.AutoConfig.for_model(**hf_config["text_config"])
    auto = transformers.AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else transformers.AutoModelForCausalLM
    language_model = auto.from_config(text_config)
    lm_state = {k[len("language_model.") :]: v for k, v in hf.items() if k.startswith("language_model.")}
    missing, unexpected = language_model.load_state_dict(lm_state, strict=False)
    tied = {"lm_head.weight", "decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    if unexpected or [k for k in missing if k not in tied]:
        raise ValueError(f"{folder}: language model weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    language_model.tie_weights()
    lm_folder = out / "language_model"
    language_model.save_pretrained(str(lm_folder))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config.language_model = LanguageModelConfig(path=str(lm_folder.resolve()))
    model = Stage2Model(config)
    inverse = {stage2_key_to_hf(k): k for k in model.state_dict() if not k.startswith(("visual_encoder.", "language_model."))}
    state = {}
    for key, value in hf.items():
        if key.startswith(("language_model.", "vision_model.")) and key not in inverse:
            continue
        if key not in inverse:
            raise KeyError(f"transformers key {key!r} has no counterpart in our stage-2 model")
        state[inverse[key]] = value
    load_strict(model, state, str(folder), ("visual_encoder.", "language_model."))
    save_stage2(model, tokenizer, out)
    notes.append(f"language model saved as a local folder ({lm_folder.name}/), image token index {hf_config.get('image_token_index')}")
    return notes


def export_hf(folder: str | Path, out: str | Path) -> list[str]:
    """Our export -> a folder `Blip2ForImageTextRetrieval` / `Blip2ForConditionalGeneration.from_pretrained` loads."""
    import transformers

    model, tokenizer, stage = load_model(folder)
    out = Path(out)
    size = model.config.vision_config.image_size
    image_processor = transformers.BlipImageProcessor(
        size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_convert_rgb=True
    )
    notes = []
    if model.config.vision_config.ln_vision_eps != model.visual_encoder.model.blocks[0].norm1.eps:
        notes.append(
            f"transformers' post_layernorm (our ln_vision) will use eps {model.visual_encoder.model.blocks[0].norm1.eps} "
            f"instead of {model.config.vision_config.ln_vision_eps}: outputs differ very slightly"
        )
    if stage == 1:
        hf, dropped = to_hf_retrieval(model)
        notes += [f"not in transformers (left out): {k}" for k in dropped]
        hf.config.architectures = ["Blip2ForImageTextRetrieval"]
        hf.save_pretrained(str(out))
        transformers.Blip2Processor(image_processor, tokenizer).save_pretrained(str(out))
        return notes
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    hf = to_hf_generation(model, image_token_index)
    if image_token_index >= hf.language_model.get_input_embeddings().num_embeddings:
        hf.language_model.resize_token_embeddings(image_token_index + 1)  # a placeholder row, replaced by the queries
        hf.config.text_config.vocab_size = image_token_index + 1
    hf.config.architectures = ["Blip2ForConditionalGeneration"]
    hf.save_pretrained(str(out))
    transformers.Blip2Processor(image_processor, tokenizer, num_query_tokens=model.config.num_query_tokens).save_pretrained(str(out))
    notes.append(f"image token {IMAGE_TOKEN!r} added to the tokenizer as id {image_token_index}")
    return notes
