"""Stage-2 transfer (VPGTrans): a Q-Former trained against one LM starts stage 2 against another.

The new model takes the source export's Q-Former and `ln_vision` (everything but the projection, whose width is the
old LM's) and keeps a new projection. Optionally the new projection starts as the old one followed by a word
converter: a ridge least-squares map from the old LM's input embeddings to the new LM's, fitted on the words both
tokenizers hold as one token (VPGTrans merges W_t = W_w W_s, b_t = W_w b_s + b_w).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from qformer.config import Blip2Config
from qformer.files import read_safetensors
from qformer.folders import FROZEN_PREFIX, LM_PREFIX, TEXT_EMBEDDINGS, is_text_weight, load_strict, read_config, read_export_info

PROJECTION = "language_projection."
# The image encoder's fields that change the features the Q-Former was trained on (not where its file lies).
ENCODER_FIELDS = ("model_name", "image_size", "drop_last_blocks", "model_kwargs", "ln_vision_eps")
RIDGE = 1e-2  # the ridge penalty, relative to the mean squared norm of the centred source embeddings


def differences(source: Blip2Config, target: Blip2Config) -> list[str]:
    """'field: source value vs target value' for every Q-Former or image-encoder field the two configs disagree on."""
    pairs = [(f"qformer_config.{k}", v, getattr(target.qformer_config, k)) for k, v in dataclasses.asdict(source.qformer_config).items()]
    pairs.append(("num_query_tokens", source.num_query_tokens, target.num_query_tokens))
    pairs += [(f"vision_config.{k}", getattr(source.vision_config, k), getattr(target.vision_config, k)) for k in ENCODER_FIELDS]
    return [f"{name} is {a!r} there but {b!r} in this run" for name, a, b in pairs if a != b]


def check_source(folder: str | Path) -> None:
    """A transfer starts from a stage-2 export: say so in one line before any model is built."""
    stage = read_export_info(folder).get("stage")
    if stage != 2:
        raise ValueError(f"model.init_from: {folder} is a stage-{stage} export; transfer starts from a stage-2 export "
                         f"(a stage-1 export is given as model.stage1)")


def load_for_transfer(model, folder: str | Path) -> dict[str, Tensor]:
    """Load a stage-2 export's Q-Former and ln_vision into `model` (a Stage2Model against another LM); strict but for
    the projection, which stays as initialised. Returns the export's projection (`weight`, `bias`).

    Between a plain and an instruction-aware model (`qformer_text_input`) only the Q-Former's text side differs: a
    plain model leaves the source's text weights out; an instruction-aware one from a plain source keeps its own
    (`load_text_weights` fills them from the stage-1 export).
    """
    folder = Path(folder)
    check_source(folder)
    wrong = differences(read_config(folder), model.config)
    if wrong:
        raise ValueError(f"model.init_from: {folder} was trained with another Q-Former or image encoder: {wrong[0]}"
                         f"{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}")
    state = read_safetensors(folder / "model.safetensors")
    projection = {k[len(PROJECTION):]: state.pop(k) for k in [k for k in state if k.startswith(PROJECTION)]}
    if not model.config.qformer_text_input:
        state = {k: v for k, v in state.items() if not is_text_weight(k)}
    may_miss = (FROZEN_PREFIX, LM_PREFIX, PROJECTION)
    if model.config.qformer_text_input and not read_config(folder).qformer_text_input:
        may_miss += TEXT_EMBEDDINGS + tuple(f"qformer.layers.{i}.text_ffn." for i in range(len(model.qformer.layers)))
    load_strict(model, state, str(folder), may_miss)
    return projection


# --- the least-squares word converter -------------------------------------------------------------------------------
def _single_token(tokenizer, word: str) -> int | None:
    """The id of `word` as one token, mid-sentence (" word") or alone; None when it takes several."""
    for text in (f" {word}", word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    return None


def shared_words(source_tokenizer, target_tokenizer) -> tuple[list[int], list[int]]:
    """(source ids, target ids) of the alphabetic words both tokenizers hold as one token."""
    source_ids, target_ids, seen = [], [], set()
    for index in range(len(source_tokenizer)):
        word = source_tokenizer.decode([index]).strip()
        if not word.isalpha() or word in seen:
            continue
        seen.add(word)
        s, t = _single_token(source_tokenizer, word), _single_token(target_tokenizer, word)
        if s is not None and t is not None:
            source_ids.append(s)
            target_ids.append(t)
    return source_ids, target_ids


def word_converter(source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Ridge least squares: (M (H_t, H_s), c (H_t,)) minimising |source M^T + c - target|^2 + lambda |M|^2 over rows."""
    source, target = source.double(), target.double()
    source_mean, target_mean = source.mean(0), target.mean(0)
    x, y = source - source_mean, target - target_mean  # (N, H_s), (N, H_t)
    penalty = RIDGE * x.pow(2).sum() / len(x)
    m = torch.linalg.solve(x.T @ x + penalty * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y).T  # (H_t, H_s)
    return m.float(), (target_mean - m @ source_mean).float()


@torch.no_grad()
def lstsq_projection(old: dict[str, Tensor], source_folder: str | Path, target_lm, target_tokenizer) -> dict[str, Tensor]:
    """The new projection = the old one followed by the word converter from the old LM's embeddings to the new one's."""
    from qformer.language_model import FrozenLanguageModel, load_lm_tokenizer

    config = read_config(source_folder).language_model
    source_lm, source_tokenizer = FrozenLanguageModel(config), load_lm_tokenizer(config)
    source_ids, target_ids = shared_words(source_tokenizer, target_tokenizer)
    if len(source_ids) < 2:
        raise ValueError(f"model.init_projection lstsq: the two LMs' tokenizers share {len(source_ids)} single-token "
                         f"word(s); at least 2 are needed (use model.init_projection new)")
    m, c = word_converter(source_lm.embed(torch.tensor(source_ids)).float(), target_lm.embed(torch.tensor(target_ids)).float())
    return {"weight": m @ old["weight"].float(), "bias": m @ old["bias"].float() + c}
