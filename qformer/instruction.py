"""The instruction an instruction-aware Q-Former reads (InstructBLIP): BERT tokens after the learned queries.

The same text goes to the Q-Former (here, in BERT's tokens) and to the language model (as its prompt, in its own
tokens), in training and in generation alike, as LAVIS's `blip2_*_instruct` and transformers' `InstructBlipProcessor`
do. In the Q-Former the instruction's tokens follow the queries in one bidirectional self-attention
(`[query_atts, instruction_atts]`); only the queries cross-attend to the image and only their outputs are projected.

Shapes: B batch, Q queries, L instruction tokens.
"""

from __future__ import annotations

from torch import Tensor

from qformer.masks import padding_mask, with_queries

MAX_INSTRUCTION_TOKENS = 128  # LAVIS's max_txt_len for the instruction


QFORMER_KEYS = ("qformer_input_ids", "qformer_attention_mask")  # the batch keys and the model's arguments


def instruction_tokens(tokenizer, instructions: list[str], max_length: int = MAX_INSTRUCTION_TOKENS) -> dict[str, Tensor]:
    """Instructions -> {"qformer_input_ids", "qformer_attention_mask"} (B, L) in the Q-Former's BERT tokens.

    Padded to the longest; a longer instruction keeps its end (LAVIS truncates from the left: the question and
    "Short answer:" stand at the end of a template), and its [CLS] ... [SEP] frame.
    """
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        tokens = tokenizer(list(instructions), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.truncation_side = side
    return {"qformer_input_ids": tokens["input_ids"], "qformer_attention_mask": tokens["attention_mask"]}


def instruction_attention(num_queries: int, qformer_attention_mask: Tensor) -> Tensor:
    """(B, L) 1 = real instruction token -> the bool (B, 1, 1, Q + L) mask of [queries ; instruction]: every position
    sees every query and every real instruction token (bidirectional, padding hidden)."""
    return padding_mask(with_queries(num_queries, qformer_attention_mask))
