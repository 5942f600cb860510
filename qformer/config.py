"""Architecture configs: one dataclass per part, field names as in transformers' `Blip2*Config`.

A config is data. Presets are named instances (`preset("vitg")`), and files are read strictly:
an unknown key or a value of the wrong type fails with the dotted field name and the file.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or dict does not describe a valid config."""


@dataclass
class QFormerConfig:
    """The BERT-style Q-Former (`Blip2QFormerConfig`). Defaults: bert-base + [DEC], ViT-g features."""

    vocab_size: int = 30523  # bert-base-uncased (30522) + [DEC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2  # cross-attention in layers 0, f, 2f, ...
    encoder_hidden_size: int = 1408  # width of the image features the queries attend to


@dataclass
class VisionConfig:
    """The frozen timm image encoder.

    `drop_last_blocks=1` is the paper's choice: the Q-Former sees the second-to-last block's tokens,
    without the final norm. `precision="auto"` keeps the weights in fp16 on CUDA; on CPU in bf16 under a bf16
    autocast (`--trainer.precision bf16-mixed`), fp32 otherwise.
    """

    model_name: str = "eva_giant_patch14_clip_224"
    image_size: int = 224
    drop_last_blocks: int = 1
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    weights_path: str | None = None  # local .safetensors / .pth / .bin; None = random init
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    ln_vision_eps: float = 1e-5  # LAVIS's ln_vision; models imported from transformers use its 1e-6


@dataclass
class LoraSettings:
    """LoRA adapters on the frozen language model (`qformer.lora`); the fields are PEFT's `LoraConfig` fields.

    The LM's own weights stay frozen; each targeted linear layer W gets a trainable update (lora_alpha / r) * B A of
    rank r, B starting at zero, so training starts from the frozen LM's outputs.
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None: PEFT's choice for the model type (q_proj, v_proj for OPT and Llama; q, v for T5)


@dataclass
class LanguageModelConfig:
    """The frozen stage-2 language model: a local transformers folder, a GGUF file, or a config to build (random) weights from.

    A GGUF file (llama.cpp's format; transformers dequantises it to fp32 on load, which needs the `gguf` and
    `accelerate` packages) is given as `path` to the `.gguf` file itself, or as `path` to its folder plus `gguf_file`;
    the tokenizer then comes from the same file.

    `precision="auto"` on CUDA is bf16 for encoder-decoder models (FlanT5 overflows in fp16) and fp16 for
    decoder-only ones; on CPU it is bf16 under a bf16 autocast (`--trainer.precision bf16-mixed`), fp32 otherwise. fp16 is refused for encoder-decoder models.
    """

    path: str | None = None  # folder with config.json + weights (+ tokenizer), loaded with from_pretrained; or a .gguf file
    gguf_file: str | None = None  # the GGUF file's name inside the folder `path`
    config: dict | None = None  # transformers config as a dict (with "model_type"), when there is no folder
    tokenizer: str | None = None  # tokenizer folder, when it is not inside `path`
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    eos_text: str | None = None  # appended to decoder-only targets; None = "\n" (as LAVIS for OPT) where it is one token, else eos
    max_text_length: int = 32
    lora: LoraSettings | None = None  # a new LoRA adapter to train on the LM (stage-2 `model.lm_lora`)
    adapter: str | None = None  # a trained LoRA adapter in PEFT's folder layout, applied on load (exports: "lm_adapter")


@dataclass
class Blip2Config:
    """The whole BLIP-2 model (`Blip2Config`): image encoder, Q-Former, heads and (stage 2) the language model."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    qformer_config: QFormerConfig = field(default_factory=QFormerConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256  # ITC projection width
    max_text_length: int = 32  # tokens per caption in stage 1
    language_model: LanguageModelConfig | None = None  # stage 2 only
    # Stage 2: the instruction's BERT tokens follow the queries in the Q-Former's self-attention (InstructBLIP; the
    # BLIP-2 VQA fine-tune). The Q-Former then keeps its word/position embeddings and text feed-forward weights.
    qformer_text_input: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "Blip2Config":
        return _build(cls, data, source, prefix="")

    @classmethod
    def from_file(cls, path: str | Path) -> "Blip2Config":
        return cls.from_dict(read_mapping(path), source=str(path))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(text, sort_keys=False))
        else:
            path.write_text(json.dumps(text, indent=2) + "\n")


PRESETS: dict[str, Blip2Config] = {
    # The paper: EVA ViT-g/14 without its last block (39 x 1408 wide) + bert-base Q-Former, 32 queries.
    "vitg": Blip2Config(
        vision_config=VisionConfig(model_name="eva_giant_patch14_clip_224", precision="auto"),
        qformer_config=QFormerConfig(encoder_hidden_size=1408),
    ),
    # The paper's smaller encoder: CLIP ViT-L/14 without its last block (23 x 1024 wide).
    "vitl": Blip2Config(
        vision_config=VisionConfig(model_name="vit_large_patch14_clip_224"),
        qformer_config=QFormerConfig(encoder_hidden_size=1024),
    ),
    # A few-hundred-kilobyte model for tests and the CPU demo.
    "tiny": Blip2Config(
        vision_config=VisionConfig(
            model_name="vit_tiny_patch16_224",
            image_size=32,
            precision="fp32",
            model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2},
        ),
        qformer_config=QFormerConfig(
            vocab_size=30523,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            encoder_hidden_size=32,
        ),
        num_query_tokens=8,
        image_text_hidden_size=16,
    ),
}


def preset(name: str) -> Blip2Config:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return Blip2Config.from_dict(PRESETS[name].to_dict(), source=f"preset {name!r}")


def resolve_config(name_or_path: str | Path) -> Blip2Config:
    """A preset name (vitg, vitl, tiny) or a JSON/YAML model config file."""
    if str(name_or_path) in PRESETS:
        return preset(str(name_or_path))
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a model config file")
    return Blip2Config.from_file(path)


def read_mapping(path: str | Path) -> dict:
    """Read a JSON or YAML file that must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:  # yaml and json raise different types
        raise ConfigError(f"cannot parse {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def build_config(cls: type, data: Any, source: str, prefix: str = ""):
    """Dataclass `cls` from a mapping, strictly (unknown keys and wrong types fail naming `prefix` + the field)."""
    return _build(cls, data, source, prefix)


def _build(cls: type, data: Any, source: str, prefix: str):
    """Build dataclass `cls` from `data`, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: field {prefix.rstrip('.') or '<root>'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(prefix + k for k in unknown)}; "
            f"known fields: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in data.items():
        values[name] = _check_value(hints[name], value, source, prefix + name)
    return cls(**values)


def _check_value(hint: Any, value: Any, source: str, name: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, name + ".")
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    for kind in allowed:
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            return _build(kind, value, source, name + ".")
        kind = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, bool):
            continue
        if kind is not type(None) and isinstance(value, kind):
            return value
    expected = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{source}: field {name} must be {expected}, got {value!r} ({type(value).__name__})")


_UnionType = type(int | None)
