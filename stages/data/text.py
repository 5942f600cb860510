"""Captions -> the stage-1 Q-Former's tokens, made in the data workers (stage 2's LM text, and an instruction-aware
Q-Former's instruction tokens, are `stages.train.stage2.LanguageModelText`); `Collate` calls whichever the training
module gives it."""

from __future__ import annotations


class BertText:
    """Captions -> the Q-Former's tokens (stage 1): BERT's tokenizer, fixed-length padding as LAVIS (every rank's text
    then has the same shape, which the ITM gather needs)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, captions: list[str], keys: list[tuple[int, int]]) -> dict:
        text = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
