"""LoRA on the frozen language model, with PEFT: a new adapter to train, a saved one to apply, merging, saving.

PEFT injects its LoRA layers into the transformers model in place: the model keeps its own class, `generate`,
`base_model` and config, and runs the adapter wherever a targeted layer runs. So the rest of the code (stage 2, the
Q-Former, generation) needs to know nothing of LoRA; only `FrozenLanguageModel` holds the `PeftModel` that saves the
adapter (`save_pretrained`: PEFT's own folder layout) and merges it (`merge_and_unload`).

Parameter names inside the LM change with the injection: a targeted `q_proj.weight` becomes `q_proj.base_layer.weight`
beside the adapter's `q_proj.lora_A.default.weight` and `q_proj.lora_B.default.weight`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qformer.config import LoraSettings

ADAPTER_FOLDER = "lm_adapter"  # an export's adapter, PEFT's layout (adapter_config.json + adapter_model.safetensors)
PEFT_INSTALL_HINT = "pip install 'peft>=0.17' (or the [lora] extra: pip install -e '.[lora]')"


def is_adapter_key(name: str) -> bool:
    """A LoRA weight (`...lora_A.default.weight`), not a frozen one."""
    return ".lora_" in name or name.startswith("lora_")


def require_peft(field: str) -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError(f"{field}: LoRA needs the peft package, which is not installed: {PEFT_INSTALL_HINT}") from None


def check_settings(settings: LoraSettings, field: str) -> None:
    """Each value a user may get wrong, in one line naming the field."""
    if settings.r < 1:
        raise ValueError(f"{field}.r (the rank) must be at least 1, got {settings.r}")
    if not settings.lora_alpha > 0:
        raise ValueError(f"{field}.lora_alpha must be > 0, got {settings.lora_alpha}")
    if not 0 <= settings.lora_dropout < 1:
        raise ValueError(f"{field}.lora_dropout must be in [0, 1), got {settings.lora_dropout}")
    if settings.target_modules is not None and not settings.target_modules:
        raise ValueError(f"{field}.target_modules: name at least one module (e.g. [q_proj, v_proj]), or leave it out")


def add_adapter(model: nn.Module, settings: LoraSettings, field: str = "language_model.lora"):
    """A new, trainable LoRA adapter on `model` (a transformers LM, its own weights frozen): the `PeftModel`."""
    require_peft(field)
    check_settings(settings, field)
    from peft import LoraConfig, get_peft_model

    task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    config = LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=settings.target_modules, task_type=task)
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # "Target modules {...} not found in the base model": a name the LM does not have
        raise ValueError(f"{field}.target_modules: {str(error).splitlines()[0]}") from None


def load_adapter(model: nn.Module, folder: str | Path, trainable: bool = False, field: str = "language_model.adapter"):
    """A saved adapter (PEFT's folder layout) applied to `model`: the `PeftModel`."""
    require_peft(field)
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{field}: {folder} is not a PEFT adapter folder (no adapter_config.json)")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


def base_state(model: nn.Module) -> dict:
    """The LM's own weights under their own names, without the adapter: what `save_pretrained` of the LM alone writes."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not is_adapter_key(k)}
