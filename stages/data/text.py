"""Captions -> the stage-1 Q-Former's tokens, and instructions -> an instruction-aware Q-Former's, made in the data
workers (stage 2's LM text is `stages.train.stage2.LanguageModelText`); `Collate` calls whichever the training module
gives it."""

from __future__ import annotations


class BertText:
    """Captions -> the Q-Former's tokens (stage 1): BERT's tokenizer, fixed-length padding as LAVIS (every rank's text
    then has the same shape, which the ITM gather needs)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, captions: list[str], keys: list[tuple[int, int]]) -> dict:
        text = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


QFORMER_INSTRUCTION_LENGTH = 128  # InstructBLIP's max_txt_len for the Q-Former's instruction tokens


def qformer_instruction_tokens(tokenizer, instructions: list[str], max_length: int = QFORMER_INSTRUCTION_LENGTH) -> dict:
    """Instructions -> `qformer_input_ids` / `qformer_attention_mask`: the Q-Former's BERT tokens of an instruction-aware
    model (`qformer_text_input`), padded to the batch's longest and, as LAVIS, truncated on the left (the end of an
    instruction, where the question is asked, is kept)."""
    tokenizer.truncation_side = "left"
    tokens = tokenizer(instructions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"qformer_input_ids": tokens["input_ids"], "qformer_attention_mask": tokens["attention_mask"]}
