"""The frozen language model of stage 2: any local transformers causal or seq2seq LM, or a GGUF file; with LoRA, an
adapter on it trains (`qformer.lora`) while its own weights stay frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from qformer.config import LanguageModelConfig
from qformer.files import read_gguf, read_tokenizer
from qformer.frozen import Frozen
from qformer.lora import add_adapter, base_state, is_adapter_key, load_adapter
from qformer.packing import pack, plan_packing, right_padded_lengths, unpack

# Causal LMs whose logits are exactly their output embedding applied to their base model's last hidden state (no
# soft-capping or scaling after the head, as Gemma 2 and Cohere have): stage 2 runs their head on labelled positions only.
PLAIN_HEAD_MODEL_TYPES = ("opt", "llama", "mistral", "qwen2", "gpt2")
# Causal LMs whose positions come from `position_ids` and whose causal mask (transformers' `create_causal_mask`) starts
# a new sequence where the positions restart: stage 2 packs two samples per row for them (`qformer.packing`). OPT is
# not one: it derives its positions from the attention mask.
PACKING_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


class FrozenLanguageModel(Frozen):
    """A transformers causal or seq2seq LM, from a local folder, a GGUF file or a config; frozen, in its own precision."""

    def __init__(self, config: LanguageModelConfig):
        import transformers

        if (config.path is None) == (config.config is None):
            raise ValueError("language_model: give exactly one of path (a local folder or .gguf file) or config (a dict)")
        if config.path is not None:
            hf_config = from_local(transformers.AutoConfig, config)
        else:
            config_dict = dict(config.config)
            if "model_type" not in config_dict:
                raise ValueError("language_model.config needs a 'model_type' (e.g. 'opt' or 't5')")
            hf_config = transformers.AutoConfig.for_model(**config_dict)
        encoder_decoder = bool(getattr(hf_config, "is_encoder_decoder", False))
        if encoder_decoder and config.precision == "fp16":
            raise ValueError("language_model.precision: fp16 overflows in T5-style models; use bf16 or fp32")
        super().__init__(config.precision, "language_model.precision", torch.bfloat16 if encoder_decoder else torch.float16)
        auto = transformers.AutoModelForSeq2SeqLM if encoder_decoder else transformers.AutoModelForCausalLM
        if config.path is not None:
            self.model = from_local(auto, config, config=hf_config)
        else:
            self.model = auto.from_config(hf_config)
        self.is_encoder_decoder = encoder_decoder
        self.own_attention = self.model.config._attn_implementation  # SDPA where the model has it
        self.packs_sequences = not encoder_decoder and self.model.config.model_type in PACKING_MODEL_TYPES
        self.freeze()
        self._add_lora(config)

    # --- LoRA ---------------------------------------------------------------------------------------------------
    def _add_lora(self, config: LanguageModelConfig) -> None:
        """A saved adapter (an export's) is applied frozen; `lora` settings alone add a new one to train.

        The `PeftModel` is kept out of the module tree (`self.model` already holds its layers: registering it too
        would name every weight twice); it is what saves and merges the adapter.
        """
        if config.adapter is not None:
            peft_model = load_adapter(self.model, config.adapter)
        elif config.lora is not None:
            peft_model = add_adapter(self.model, config.lora)
        else:
            peft_model = None
        self.__dict__["peft_model"] = peft_model
        if peft_model is not None:
            self.model = peft_model.get_base_model()  # the same transformers model, its LoRA layers injected

    @property
    def has_adapter(self) -> bool:
        return self.peft_model is not None

    def save_adapter(self, folder: Path) -> None:
        """The adapter alone, in PEFT's layout (`PeftModel.from_pretrained` and `qformer.lora.load_adapter` read it)."""
        self.peft_model.save_pretrained(str(folder))

    def save_language_model(self, folder: Path) -> None:
        """The LM's own weights, without the adapter, as a transformers folder."""
        self.model.save_pretrained(str(folder), state_dict=base_state(self.model) if self.has_adapter else None)

    def merge_adapter(self) -> None:
        """Fold the adapter into the LM's weights (W + scale * B A): a plain transformers model, equal outputs."""
        self.model = self.peft_model.merge_and_unload()
        self.__dict__["peft_model"] = None

    def cast(self, dtype: torch.dtype) -> None:
        """The frozen weights to `dtype`; the adapter keeps its fp32 weights (its master copy: it trains)."""
        adapter = {p: p.data for name, p in self.model.named_parameters() if is_adapter_key(name)}
        self.model.to(dtype)
        for param, data in adapter.items():
            param.data = data

    def train(self, mode: bool = True) -> "FrozenLanguageModel":
        """The LM stays in eval mode; only the adapter's dropout follows `mode`."""
        super().train(False)
        for name, module in self.model.named_modules():
            if name.endswith("lora_dropout"):
                module.train(mode)
        return self

    def use_attention_for(self, device: torch.device) -> None:
        """Eager attention where a backward will follow on a CPU; the model's own (SDPA) otherwise.

        torch's CPU flash-attention backward in bf16 takes ~9x its forward at stage 2's short sequences (15 ms a call
        for SmolLM2 at batch 48 and 29 positions, 29 % of the step); with eager attention (matmul + softmax) the
        bf16 step takes 1.34 s instead of 1.85 s, and in fp32 the two are equal. The sequences are short (the soft
        prompts and at most max_text_length tokens), so eager attention's quadratic scores cost nothing. Without
        gradients (generation, validation) SDPA's forward is the faster one (~8 % in beam search).
        """
        wanted = "eager" if device.type == "cpu" and torch.is_grad_enabled() else self.own_attention
        if self.model.config._attn_implementation != wanted:
            self.model.set_attn_implementation(wanted)

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def embed(self, input_ids: Tensor) -> Tensor:  # (B, L) -> (B, L, H)
        return self.model.get_input_embeddings()(input_ids)

    @property
    def has_plain_head(self) -> bool:
        return not self.is_encoder_decoder and self.model.config.model_type in PLAIN_HEAD_MODEL_TYPES

    def last_hidden_state(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T, H), before the LM head; a right-padded batch runs packed where the LM allows it (zeros at padding)."""
        lengths = right_padded_lengths(attention_mask) if self.packs_sequences else None
        if lengths is None:
            return self.model.base_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        packing = plan_packing(lengths, embeds.shape[1])
        hidden = self.model.base_model(inputs_embeds=pack(embeds, packing), position_ids=packing.position_ids,
                                       attention_mask=None, use_cache=False).last_hidden_state
        return unpack(hidden, packing, embeds.shape[0])

    def head(self, hidden: Tensor) -> Tensor:  # (..., H) -> (..., V)
        return self.model.get_output_embeddings()(hidden)


def gguf_location(config: LanguageModelConfig) -> tuple[Path, str] | None:
    """(folder, file name) when the LM is a GGUF file: `path` to the .gguf itself, or `path` + `gguf_file`."""
    if config.path is None:
        return None
    if config.gguf_file is not None:
        return Path(config.path), config.gguf_file
    path = Path(config.path)
    return (path.parent, path.name) if path.suffix.lower() == ".gguf" else None


def from_local(auto, lm: LanguageModelConfig, **kwargs):
    """`auto.from_pretrained` (AutoConfig, AutoModel*, AutoTokenizer) of the LM's folder or GGUF file, offline."""
    gguf = gguf_location(lm)
    if gguf is None:
        return auto.from_pretrained(lm.path, local_files_only=True, **kwargs)
    folder, name = gguf
    return read_gguf(folder / name, lambda: auto.from_pretrained(str(folder), gguf_file=name, local_files_only=True, **kwargs))


def load_lm_tokenizer(config: LanguageModelConfig):
    """The LM's tokenizer: its own folder (`tokenizer`, as exports have it), the GGUF file, or the LM's folder.

    A tokenizer without a pad token (Llama's; SmolLM2's GGUF names one) pads with its eos token: padding is
    masked by the attention mask and left out of the loss by position, so which id fills it does not matter.
    """
    from transformers import AutoTokenizer

    if config.tokenizer is None and gguf_location(config) is not None:
        tokenizer = from_local(AutoTokenizer, config)
    else:
        source = config.tokenizer or config.path
        if source is None:
            raise ValueError("language_model.tokenizer: a tokenizer folder is needed when the LM is built from a config")
        tokenizer = read_tokenizer(source, lambda folder: AutoTokenizer.from_pretrained(folder, local_files_only=True))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
