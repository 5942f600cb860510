"""transformers' BLIP-2 classes <-> our export folders.

* `import_hf`: a transformers `Blip2ForImageTextRetrieval` / `Blip2ForConditionalGeneration` /
  `InstructBlipForConditionalGeneration` folder -> our export.
* `export_hf`: our export -> a folder those transformers classes load with `from_pretrained`, with a processor
  (an instruction-aware stage-2 export becomes InstructBLIP, with an `InstructBlipProcessor`); a LoRA adapter on the
  LM is merged into its weights.

Every conversion is strict (see `qformer.interop.names`) and reports what it leaves out or initialises. Every output
folder is written whole or not at all (`qformer.files.atomic_folder`); a non-empty one is replaced only with
`overwrite=True`. What transformers' `Blip2Config` has no field for (`ln_vision_eps`, the generation settings
`eos_text` / `max_text_length`, precisions) travels in an extra `"qformer"` entry of its config.json, so that
`export_hf` then `import_hf` gives back the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from qformer.config import Blip2Config, LanguageModelConfig, QFormerConfig, VisionConfig
from qformer.files import atomic_folder, check_out, read_safetensors, read_tokenizer
from qformer.folders import load_model, load_strict, save_encoder_weights, write_stage1, write_stage2
from qformer.interop.instruct import ARCHITECTURE as INSTRUCT, instruct_key_to_hf, to_hf_instruct
from qformer.interop.names import stage1_from_hf, stage2_key_to_hf, to_hf_generation, to_hf_retrieval, vision_from_hf
from qformer.stage1 import Stage1Model
from qformer.stage2 import Stage2Model
from qformer.vision import IMAGE_MEAN, IMAGE_STD

IMAGE_TOKEN = "<image>"


SETTINGS_KEY = "qformer"  # our entry in a transformers config.json


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({type(error).__name__}: {error})") from error
        state = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    raise FileNotFoundError(f"no model.safetensors (or sharded index) in {folder}")


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


def _settings(config: Blip2Config) -> dict:
    """Our config fields transformers' `Blip2Config` has no place for, in `config.from_dict` shape."""
    vision = config.vision_config
    settings = {"max_text_length": config.max_text_length,
                "vision_config": {"ln_vision_eps": vision.ln_vision_eps, "precision": vision.precision}}
    if config.language_model is not None:
        lm = config.language_model
        settings["language_model"] = {"eos_text": lm.eos_text, "max_text_length": lm.max_text_length, "precision": lm.precision}
    return settings


def _with_settings(config: Blip2Config, settings: dict, source: str) -> Blip2Config:
    """`config` updated with a config.json's `"qformer"` entry, checked field by field as any config file."""
    merged = config.to_dict()
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return Blip2Config.from_dict(merged, source=f'{source} ("{SETTINGS_KEY}" entry)')


def import_hf(folder: str | Path, out: str | Path, overwrite: bool = False) -> list[str]:
    """A transformers BLIP-2 folder (safetensors) -> our export; returns what was initialised or left out."""
    import transformers

    folder = Path(folder)
    check_out(out, overwrite)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    try:
        hf_config = json.loads(config_file.read_text())
    except ValueError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from error
    architecture = (hf_config.get("architectures") or [""])[0]
    if architecture not in ("Blip2ForImageTextRetrieval", "Blip2ForConditionalGeneration", INSTRUCT):
        raise ValueError(f"{folder}: a {architecture or 'non-BLIP-2'} model; expected Blip2ForImageTextRetrieval, "
                         f"Blip2ForConditionalGeneration or {INSTRUCT}")
    hf = read_hf_weights(folder)
    qf = hf_config["qformer_config"]
    config = Blip2Config(
        qformer_config=QFormerConfig(**{k: qf[k] for k in QFormerConfig.__dataclass_fields__ if k in qf}),
        num_query_tokens=hf_config.get("num_query_tokens", 32),
        image_text_hidden_size=hf_config.get("image_text_hidden_size", 256),
    )
    config.vision_config, eva = _vision_config_from_hf(hf_config["vision_config"])
    vision_state = vision_from_hf({k[len("vision_model.") :]: v for k, v in hf.items() if k.startswith("vision_model.") and "post_layernorm" not in k}, eva)
    settings = hf_config.get(SETTINGS_KEY) or {}
    if not isinstance(settings, dict):
        raise ValueError(f'{config_file}: "{SETTINGS_KEY}" must be a mapping of our config fields, got {settings!r}')
    with atomic_folder(out, overwrite) as out_folder:
        config.vision_config.weights_path = str(save_encoder_weights(vision_state, out_folder))
        notes = [f"image encoder: timm {config.vision_config.model_name} with transformers' weights"]
        if settings:
            notes.append(f"{config_file.name}'s \"{SETTINGS_KEY}\" entry restores {', '.join(sorted(settings))}")

        if architecture == "Blip2ForImageTextRetrieval":
            from qformer.bert import load_tokenizer

            model = Stage1Model(_with_settings(config, settings, str(config_file)))
            keys = list(model.state_dict())
            state, not_filled = stage1_from_hf(hf, keys, eva)
            load_strict(model, state, str(folder), ("visual_encoder.", "temp", "lm_head."))
            notes += [f"initialised (transformers has no counterpart): {k}" for k in not_filled]
            write_stage1(model, load_tokenizer(folder), out_folder, Path(out), str(folder))
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
        lm_folder = out_folder / "language_model"
        language_model.save_pretrained(str(lm_folder))
        tokenizer = read_tokenizer(folder, lambda path: transformers.AutoTokenizer.from_pretrained(path, local_files_only=True))
        config.language_model = LanguageModelConfig(path=str(lm_folder))
        config.qformer_text_input = architecture == INSTRUCT
        model = Stage2Model(_with_settings(config, settings, str(config_file)))
        to_hf = instruct_key_to_hf if config.qformer_text_input else stage2_key_to_hf
        if config.qformer_text_input:
            model.instruction_tokenizer = _qformer_tokenizer(folder)
        inverse = {to_hf(k): k for k in model.state_dict() if not k.startswith(("visual_encoder.", "language_model."))}
        state = {}
        for key, value in hf.items():
            if key.startswith(("language_model.", "vision_model.")) and key not in inverse:
                continue
            if key not in inverse:
                raise KeyError(f"transformers key {key!r} has no counterpart in our stage-2 model")
            state[inverse[key]] = value
        load_strict(model, state, str(folder), ("visual_encoder.", "language_model."))
        write_stage2(model, tokenizer, out_folder, Path(out), str(folder))
    notes.append(f"language model saved as a local folder ({lm_folder.name}/), image token index {hf_config.get('image_token_index')}")
    return notes


def _qformer_tokenizer(folder: Path):
    """InstructBLIP's Q-Former tokenizer: the `qformer_tokenizer/` an `InstructBlipProcessor` saves."""
    from qformer.bert import load_tokenizer

    return load_tokenizer(folder / "qformer_tokenizer")


def export_hf(folder: str | Path, out: str | Path, overwrite: bool = False) -> list[str]:
    """Our export -> a folder `Blip2ForImageTextRetrieval` / `Blip2ForConditionalGeneration.from_pretrained` loads."""
    import transformers

    check_out(out, overwrite)
    model, tokenizer, stage = load_model(folder)
    notes = []
    if stage == 2 and model.language_model.has_adapter:  # transformers then loads the folder without PEFT
        model.language_model.merge_adapter()
        notes.append("the LoRA adapter is merged into the language model's weights")
    size = model.config.vision_config.image_size
    image_processor = transformers.BlipImageProcessor(
        size={"height": size, "width": size}, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), resample=3, do_convert_rgb=True
    )
    vit_eps, ours = model.visual_encoder.model.blocks[0].norm1.eps, model.config.vision_config.ln_vision_eps
    if ours != vit_eps:
        # Blip2VisionModel builds every norm, post_layernorm too, with the one layer_norm_eps of its config.
        notes.append(
            f"transformers' post_layernorm (our ln_vision) will use eps {vit_eps}, the vision tower's layer_norm_eps, "
            f"instead of {ours}: its outputs differ slightly (README: Known differences); qformer import hf restores {ours}"
        )
    with atomic_folder(out, overwrite) as out_folder:
        if stage == 1:
            hf, dropped = to_hf_retrieval(model)
            notes += [f"not in transformers (left out): {k}" for k in dropped]
            hf.config.architectures = ["Blip2ForImageTextRetrieval"]
            setattr(hf.config, SETTINGS_KEY, _settings(model.config))
            hf.save_pretrained(str(out_folder))
            transformers.Blip2Processor(image_processor, tokenizer).save_pretrained(str(out_folder))
            return notes
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        instruct = model.config.qformer_text_input
        hf = to_hf_instruct(model, image_token_index) if instruct else to_hf_generation(model, image_token_index)
        if image_token_index >= hf.language_model.get_input_embeddings().num_embeddings:
            hf.language_model.resize_token_embeddings(image_token_index + 1)  # a placeholder row, replaced by the queries
            hf.config.text_config.vocab_size = image_token_index + 1
        hf.config.architectures = [INSTRUCT if instruct else "Blip2ForConditionalGeneration"]
        setattr(hf.config, SETTINGS_KEY, _settings(model.config))
        hf.save_pretrained(str(out_folder))
        Q = model.config.num_query_tokens
        if instruct:
            qformer_tokenizer = model.instruction_tokenizer
            qformer_tokenizer.truncation_side = "left"  # as `qformer.instruction.instruction_tokens` (and LAVIS) cut
            processor = transformers.InstructBlipProcessor(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=Q)
        else:
            processor = transformers.Blip2Processor(image_processor, tokenizer, num_query_tokens=Q)
        processor.save_pretrained(str(out_folder))
    notes.append(f"image token {IMAGE_TOKEN!r} added to the tokenizer as id {image_token_index}")
    return notes
