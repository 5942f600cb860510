"""The frozen language model of stage 2: any local transformers causal or seq2seq LM, or a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from qformer.config import LanguageModelConfig
from qformer.files import read_gguf, read_tokenizer
from qformer.frozen import Frozen

# Causal LMs whose logits are exactly their output embedding applied to their base model's last hidden state (no
# soft-capping or scaling after the head, as Gemma 2 and Cohere have): stage 2 runs their head on labelled positions only.
PLAIN_HEAD_MODEL_TYPES = ("opt", "llama", "mistral", "qwen2", "gpt2")


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
        self.freeze()

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

    def last_hidden_state(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:  # (B, T, H), before the LM head
        return self.model.base_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

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
