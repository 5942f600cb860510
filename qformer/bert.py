"""Initialise the Q-Former from a local BERT folder (bert-base-uncased in the paper) and load its tokenizer.

No hub: the folder must hold `config.json`, `model.safetensors` or `pytorch_model.bin`, and `vocab.txt`.
LAVIS's Q-Former has no token-type embeddings, so BERT's are not used. The query FFN of every layer
starts as a copy of BERT's FFN, and cross-attention stays randomly initialised, as in the paper.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from qformer.config import QFormerConfig
from qformer.files import read_tokenizer
from qformer.interop.names import bert_key
from qformer.vision import load_state_dict_file

DEC_TOKEN = "[DEC]"


def load_tokenizer(path: str | Path):
    """BERT's tokenizer from a local folder, plus the `[DEC]` token (ITG's BOS)."""
    from transformers import BertTokenizerFast

    path = Path(path)
    if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer (vocab.txt or tokenizer.json) in {path}")
    tokenizer = read_tokenizer(path, lambda folder: BertTokenizerFast.from_pretrained(folder, local_files_only=True, truncation_side="right"))
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def qformer_config_from_bert(path: str | Path, **overrides) -> QFormerConfig:
    """A Q-Former config whose BERT dimensions come from `path/config.json` (vocabulary + [DEC])."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"BERT config not found: {config_file}")
    bert = json.loads(config_file.read_text())
    fields = {name: bert[name] for name in QFormerConfig.__dataclass_fields__ if name in bert}
    fields["vocab_size"] = bert["vocab_size"] + 1  # [DEC]
    fields.update(overrides)
    return QFormerConfig(**fields)


def _bert_weights(path: Path) -> dict[str, Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            state = load_state_dict_file(path / name)
            return {k.removeprefix("bert."): v for k, v in state.items()}
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")


@torch.no_grad()
def init_from_bert(model, path: str | Path) -> list[str]:
    """Copy BERT's weights from folder `path` into `model` (a Stage1Model). Returns the keys BERT did not fill."""
    bert = _bert_weights(Path(path))
    layers = sum(1 for k in bert if k.endswith("attention.self.query.weight"))
    if layers != model.config.qformer_config.num_hidden_layers:
        raise ValueError(f"{path} has {layers} layers, qformer_config.num_hidden_layers is {model.config.qformer_config.num_hidden_layers}")
    ours = model.state_dict()
    source = {key: name for key in ours if (name := bert_key(key)) is not None}
    not_filled = []
    for key, name in source.items():
        if name not in bert:
            not_filled.append(key)
            continue
        value, target = bert[name], ours[key]
        if value.shape != target.shape:
            if key.endswith(("word_embeddings.weight", "lm_head.bias")) and value.shape[1:] == target.shape[1:]:
                target[: value.shape[0]] = value  # vocabulary + [DEC]: the new row keeps its fresh init
                continue
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, Q-Former {key} needs {tuple(target.shape)}")
        target.copy_(value)
    return sorted(set(not_filled) | {k for k in ours if k not in source and not k.startswith("visual_encoder.")})
