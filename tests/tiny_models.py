"""Tiny untrained exports of both stages, built from configs (no download), for tests of the commands that load them."""

from __future__ import annotations

from pathlib import Path

import torch

from qformer.bert import load_tokenizer
from qformer.config import LanguageModelConfig, preset
from qformer.folders import save_stage1, save_stage2
from qformer.language_model import load_lm_tokenizer
from qformer.stage1 import Stage1Model
from qformer.stage2 import Stage2Model


def write_stage1(data: Path, out: Path, seed: int = 0) -> Path:
    """A tiny stage-1 export whose tokenizer is the synthetic dataset's `data/vocab.txt`; `seed` picks its weights."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    return save_stage1(Stage1Model(config), tokenizer, out)


def write_stage2(data: Path, out: Path, seed: int = 0) -> Path:
    """A tiny stage-2 export with a one-layer OPT over the dataset's word-level LM tokenizer."""
    torch.manual_seed(seed)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(load_tokenizer(data))
    config.language_model = LanguageModelConfig(
        config=dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                    word_embed_proj_dim=32, max_position_embeddings=64),
        tokenizer=str(data / "lm_tokenizer_decoder"), precision="fp32", eos_text="</s>")
    return save_stage2(Stage2Model(config), load_lm_tokenizer(config.language_model), out)
