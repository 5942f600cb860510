"""Text from a stage-2 model: generation settings, the paper's prompts, beam search and where it ends."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from qformer.instruction import instruction_tokens
from qformer.lm_text import resolve_eos_text

if TYPE_CHECKING:
    from qformer.stage2 import Stage2Model

log = logging.getLogger(__name__)


# The papers' zero-shot VQA prompts: OPT's, and the instruction-tuned LMs' (FlanT5 in BLIP-2, every LM in
# InstructBLIP), which otherwise answer in a sentence ("The red object is on the right.") that the VQA score counts wrong.
VQA_PROMPTS = {"plain": "Question: {} Answer:", "instruction_tuned": "Question: {} Short answer:"}


CAPTION_PROMPT = "a photo of"


def prompt_batch(tokenizer, prompts: list[str], encoder_decoder: bool, max_length: int | None = None) -> dict:
    """Prompts for generation: left-padded for decoder-only LMs so every row ends where generation starts.

    A prompt longer than `max_length` tokens keeps its end (where "Answer:" stands), with a warning.
    """
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    tokens = tokenizer(prompts, padding="longest", return_tensors="pt")
    if max_length is not None and tokens["input_ids"].shape[1] > max_length:  # rare: tokenise again, keeping the ends
        log.warning("a prompt longer than %d tokens (what the LM's positions leave after the soft prompts and the new "
                    "tokens) was cut to its last %d tokens", max_length, max_length)
        tokenizer.truncation_side = "left"
        tokens = tokenizer(prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        tokenizer.truncation_side = "right"
    tokenizer.padding_side = "right"
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def instruction_batch(model: "Stage2Model", prompts: list[str]) -> dict:
    """The prompts as the Q-Former's instruction (`qformer_input_ids`, ...) for an instruction-aware model; else {}."""
    if not model.config.qformer_text_input:
        return {}
    if model.instruction_tokenizer is None:
        raise ValueError("an instruction-aware model needs its Q-Former's tokenizer (model.instruction_tokenizer; "
                         "load_stage2 sets it from the export's tokenizer/ folder)")
    return instruction_tokens(model.instruction_tokenizer, prompts)


def decode_generated(tokenizer, ids: Tensor, eos_text: str | None) -> list[str]:
    """Generated ids -> text, cut at `eos_text` and stripped."""
    texts = [t.lstrip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    if eos_text:
        texts = [t.split(eos_text)[0] for t in texts]
    return [t.strip() for t in texts]


@functools.lru_cache(maxsize=4)  # a pass over the vocabulary (~0.2 s for 49k tokens), once per tokenizer, not per batch
def end_token_ids(tokenizer, eos_text: str) -> list[int]:
    """The tokens that end a text: every token whose text contains `eos_text`, and the tokenizer's eos token.

    A byte-level BPE has many tokens that hold a newline ("\\n\\n", " \\n", ".\\n"), and an instruct LM ends its
    turn with its own eos token (SmolLM2's "<|im_end|>"). With only "\\n" as the end, `min_new_tokens` holds back
    "\\n" on the first step and the LM ends with one of the others instead, which decodes to an empty answer
    (SmolLM2 answered every zero-shot question with "<|im_end|>" + "\\n").
    """
    vocabulary = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    first = tokenizer(eos_text, add_special_tokens=False)["input_ids"][0]
    own_end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return sorted({first, *own_end, *(i for i, text in enumerate(vocabulary) if eos_text in text)})


@dataclass(frozen=True)
class GenerationSettings:
    """How captions and answers are generated: beam search, or nucleus sampling when `top_p` is set.

    Args:
        num_beams: beam width (1: greedy).
        max_new_tokens: at most this many tokens after the prompt.
        min_new_tokens: at least this many (the LM's end token is held back until then).
        length_penalty: beam-score exponent on the length (> 0 favours longer texts, < 0 shorter ones).
        repetition_penalty: > 1 discourages repeating tokens.
        top_p: nucleus sampling with this probability mass instead of beam search.
        temperature: sampling temperature (with top_p).
    """

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    top_p: float | None = None
    temperature: float = 1.0

    def __post_init__(self):
        problems = []
        if self.num_beams < 1:
            problems.append(f"num_beams must be at least 1, got {self.num_beams}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got {self.min_new_tokens} "
                            f"and {self.max_new_tokens}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            problems.append(f"temperature must be positive, got {self.temperature}")
        if problems:
            raise ValueError("generation settings: " + "; ".join(problems))


CAPTION_GENERATION = GenerationSettings(min_new_tokens=8)  # LAVIS's COCO captioning: beam 5, 8 to 30 tokens


VQA_GENERATION = GenerationSettings(max_new_tokens=10, length_penalty=-1.0)  # LAVIS's zero-shot VQA: short answers


def vqa_prompt(model: "Stage2Model", tokenizer, template: str | None = None) -> str:
    """The question template: the given one, or the paper's for the kind of LM (`instruction_tuned`)."""
    return template or VQA_PROMPTS["instruction_tuned" if instruction_tuned(model, tokenizer) else "plain"]


def instruction_tuned(model: "Stage2Model", tokenizer) -> bool:
    """An LM trained to follow instructions: an encoder-decoder (BLIP-2's are FlanT5s), or one whose tokenizer has a
    chat template (SmolLM2-Instruct, Llama-2-chat, Vicuna in recent releases)."""
    return model.is_encoder_decoder or bool(getattr(tokenizer, "chat_template", None))


def lm_positions(model: "Stage2Model") -> int | None:
    """How many tokens the LM reads at most, soft prompts, prompt and new tokens together (None: no limit)."""
    if model.is_encoder_decoder:  # T5 has relative positions
        return None
    return getattr(model.language_model.model.config, "max_position_embeddings", None)


def prompt_room(model: "Stage2Model", max_new_tokens: int) -> int | None:
    """How many prompt tokens fit in the LM's positions beside the soft prompts and the new tokens (None: no limit)."""
    positions = lm_positions(model)
    if positions is None:
        return None
    room = positions - model.config.num_query_tokens - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the LM's {positions} positions "
                         f"({model.config.num_query_tokens} are the soft prompts)")
    return room


def max_new_tokens_for(model: "Stage2Model", tokenizer, prompts: list[str]) -> int | None:
    """The most new tokens that fit after the soft prompts and the longest of `prompts` (None: no limit).

    The one limit of `caption`, `ask` and the page's slider: past it, `generate_text` would cut the prompt.
    """
    positions = lm_positions(model)
    if positions is None:
        return None
    return positions - model.config.num_query_tokens - _longest_prompt(tokenizer, prompts)


def _longest_prompt(tokenizer, prompts: list[str]) -> int:
    return max(len(ids) for ids in tokenizer(list(prompts))["input_ids"])  # with the BOS token generation adds


def check_max_new_tokens(model: "Stage2Model", tokenizer, prompts: list[str], max_new_tokens: int,
                         setting: str = "--max-new-tokens", prompt_name: str = "prompt") -> None:
    """Refuse `max_new_tokens` past `max_new_tokens_for`, in the caller's words (`setting`: a flag, a slider)."""
    room = max_new_tokens_for(model, tokenizer, prompts)
    if room is None or max_new_tokens <= room:
        return
    used = (f"the language model reads at most {lm_positions(model)} tokens: {model.config.num_query_tokens} for the image, "
            f"{_longest_prompt(tokenizer, prompts)} for the {prompt_name}")
    if room < 1:
        raise ValueError(f"the {prompt_name} is too long ({used}): shorten it")
    raise ValueError(f"{setting} {max_new_tokens} is too many: at most {room} new tokens fit with this {prompt_name} ({used})")


def generate_text(
    model: Stage2Model,
    tokenizer,
    pixel_values: Tensor,
    prompts: list[str],
    settings: GenerationSettings = GenerationSettings(),
) -> list[str]:
    """Captions or answers for a batch of images, one prompt each; an instruction-aware model's Q-Former reads the
    prompt too (its instruction, as LAVIS's and transformers' InstructBLIP give the same text to both)."""
    room = prompt_room(model, settings.max_new_tokens)
    batch = prompt_batch(tokenizer, prompts, model.is_encoder_decoder, room)
    batch.update(instruction_batch(model, prompts))
    batch = {k: v.to(pixel_values.device) for k, v in batch.items()}
    kwargs = dict(
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        length_penalty=settings.length_penalty,
        repetition_penalty=settings.repetition_penalty,
        do_sample=settings.top_p is not None,
        pad_token_id=tokenizer.pad_token_id,
    )
    if settings.top_p is not None:
        kwargs.update(top_p=settings.top_p, temperature=settings.temperature)
    eos_text = None
    if not model.is_encoder_decoder:
        eos_text = resolve_eos_text(tokenizer, model.config.language_model.eos_text)
        kwargs["eos_token_id"] = end_token_ids(tokenizer, eos_text)
    ids = model.generate(pixel_values, **batch, **kwargs)
    return decode_generated(tokenizer, ids, eos_text)
