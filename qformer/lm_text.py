"""The language model's text in training: label batches, prompt masking, the end of a caption."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

from torch import Tensor

IGNORE = -100


DEFAULT_EOS_TEXT = "\n"  # LAVIS ends OPT captions with a newline and stops generating there (see resolve_eos_text)


# --- text batches -----------------------------------------------------------------------------------
@dataclass
class TextBatch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    decoder_attention_mask: Tensor | None = None

    def as_kwargs(self) -> dict:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}
        if self.decoder_attention_mask is not None:
            kwargs["decoder_attention_mask"] = self.decoder_attention_mask
        return kwargs


def decoder_only_batch(tokenizer, texts: list[str], prompt: str | list[str] = "", eos_text: str = DEFAULT_EOS_TEXT,
                       max_length: int = 32) -> TextBatch:
    """`prompt + text + eos_text` right-padded; labels only on the text and eos (not BOS, prompt or padding).

    `prompt` is one for every text, or one per text (an instruction: InstructBLIP's `[instruction ; output + eos]`).

    The prompt is masked as its tokens occur in the full text, not as `len(tokenizer(prompt))`: a byte-level BPE
    (OPT, GPT-2, SmolLM2) tokenises the trailing space of "a photo of " on its own, but in "a photo of a dog"
    that space belongs to the next word, whose token must stay in the loss.
    """
    prompts = [prompt] * len(texts) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(texts):
        raise ValueError(f"decoder_only_batch: {len(prompts)} prompts for {len(texts)} texts")
    tokenizer.padding_side = "right"
    fast = getattr(tokenizer, "is_fast", False)  # then one tokenisation gives the ids and the character offsets
    prompts = [joined(p, t) for p, t in zip(prompts, texts)]
    tokens = tokenizer([p + t + eos_text for p, t in zip(prompts, texts)], padding="longest", truncation=True, max_length=max_length,
                       return_tensors="pt", return_offsets_mapping=fast, return_special_tokens_mask=fast)
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, IGNORE)
    for row, length in enumerate(prompt_token_counts(tokenizer, tokens, prompts)):
        labels[row, :length] = IGNORE
    return TextBatch(tokens["input_ids"], tokens["attention_mask"], labels)


def joined(prompt: str, text: str) -> str:
    """The prompt as it stands before `text`: a space between them where neither has one ("Short answer:" + "red",
    "a photo of" + "a dog"); as it is otherwise (an empty prompt, "a photo of " + "a dog", "a photo of" + " a dog")."""
    if prompt and not prompt[-1].isspace() and text and not text[0].isspace():
        return prompt + " "
    return prompt


def prompt_token_counts(tokenizer, tokens, prompt: str | list[str]) -> list[int]:
    """Per row of `tokens`, how many leading tokens (special ones included) lie entirely inside `prompt` (that row's
    prompt, when one is given per row).

    From character offsets when the tokenizer is fast; otherwise by the common start of the ids of the prompt
    alone and of the whole text (a token the prompt shares with the text is then not counted).
    """
    prompts = [prompt] * len(tokens["input_ids"]) if isinstance(prompt, str) else prompt
    counts = []
    if "offset_mapping" in tokens:
        for offsets, special, row_prompt in zip(tokens["offset_mapping"].tolist(), tokens["special_tokens_mask"].tolist(), prompts):
            count = 0
            while count < len(offsets) and (special[count] or offsets[count][1] <= len(row_prompt)):
                count += 1
            counts.append(count)
        return counts
    ids_of = {p: tokenizer(p)["input_ids"] for p in set(prompts)}
    for ids, row_prompt in zip(tokens["input_ids"].tolist(), prompts):
        prompt_ids = ids_of[row_prompt]
        count = 0
        while count < min(len(ids), len(prompt_ids)) and ids[count] == prompt_ids[count]:
            count += 1
        counts.append(count)
    return counts


def encoder_decoder_batch(tokenizer, prefixes: list[str], targets: list[str], max_length: int = 32) -> TextBatch:
    """Prefixes to the encoder (after the soft prompts), targets to the decoder; padding ignored."""
    source = tokenizer(prefixes, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    target = tokenizer(targets, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE)
    return TextBatch(source["input_ids"], source["attention_mask"], labels, target["attention_mask"])


def split_caption(caption: str, rng: random.Random) -> tuple[str, str]:
    """The paper's prefix language modelling: cut at a random word between the first and the middle."""
    words = caption.split()
    if len(words) < 2:
        return "", caption
    cut = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:cut]), " ".join(words[cut:])


def resolve_eos_text(tokenizer, eos_text: str | None) -> str:
    """The text a decoder-only caption ends with, in training and in generation alike.

    Default "\\n", as LAVIS for OPT, wherever it is one token: in the byte-level BPEs of OPT, GPT-2, Llama 3 and
    SmolLM2 ("Ċ"), where a pretrained LM ends a line with it on its own, so zero-shot answers stop there too.
    A SentencePiece Llama (1 and 2) splits it into "▁" + "<0x0A>", and generation stops at the first token of the
    end text, which would be any space: such a tokenizer ends captions with its eos token ("</s>") instead.
    A tokenizer that drops the text (a word-level one drops "\\n") would train captions without an end and generate
    without a stop: its eos token is used instead, with a warning.
    """
    if not eos_text:
        eos_text = DEFAULT_EOS_TEXT
        if len(tokenizer(eos_text, add_special_tokens=False)["input_ids"]) > 1 and tokenizer.eos_token is not None:
            return tokenizer.eos_token
    if tokenizer(eos_text, add_special_tokens=False)["input_ids"]:
        return eos_text
    if tokenizer.eos_token is None:
        raise ValueError(f"language_model.eos_text {eos_text!r} is no token for this tokenizer, which has no eos token either: "
                         "set language_model.eos_text (--model.eos_text, or the export's config.json) to a text it knows")
    warnings.warn(f"language_model.eos_text {eos_text!r} tokenises to nothing; captions end with the tokenizer's "
                  f"eos token {tokenizer.eos_token!r} instead", stacklevel=2)
    return tokenizer.eos_token
