"""Sequence packing for stage 2's decoder-only LM: two samples share a row, so far fewer positions are padding.

A batch of right-padded sequences (B, T) becomes R = ceil(B / 2) rows: the longest samples are placed first, each in
the row that holds the fewest positions so far, and the rows are as long as the fullest one. Every sample's positions
restart at 0 (`position_ids`), which transformers reads as a new sequence: its causal mask then keeps the samples of
a row apart, and rotary or learned position embeddings see the same positions as in the padded batch. The outputs are
the padded batch's, up to the order of floating-point sums.

Why two per row: on the demo's captions (8 soft prompts + 8 to 21 tokens, batch 24) padding is 23 % of the positions.
Two per row leave 81 % of the padded positions, three 79 % for twice the attention scores, and a stage-2 step against
a SmolLM2-shaped LM in bf16 takes 1.15 s instead of 1.30 s on 2 CPU cores (`benchmarks/packing.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SAMPLES_PER_ROW = 2


@dataclass
class Packing:
    """Where each position of a right-padded (B, T) batch goes in the packed (rows, length) one."""

    rows: int
    length: int
    position_ids: Tensor  # (rows, length): each sample's positions from 0; padding at a row's end is 0
    source: Tensor  # (rows * length,): the flat (B * T) position each packed position takes; B * T for padding
    target: Tensor  # (B * T,): the flat packed position each position of the batch went to; rows * length for padding


def right_padded_lengths(attention_mask: Tensor) -> Tensor | None:
    """Each row's number of tokens when the mask is ones then zeros (right padding); None otherwise."""
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
        return None
    return lengths


def assign_rows(lengths: list[int], rows: int) -> list[list[int]]:
    """The samples of each row: longest first, each into the row with the fewest positions so far."""
    members: list[list[int]] = [[] for _ in range(rows)]
    load = [0] * rows
    for sample in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = min(range(rows), key=lambda r: (load[r], r))
        members[row].append(sample)
        load[row] += lengths[sample]
    return members


def plan_packing(lengths: Tensor, padded_length: int) -> Packing:
    """The packing of a right-padded batch whose rows hold `lengths` tokens (B,) out of `padded_length`."""
    B, T = len(lengths), padded_length
    sizes = lengths.tolist()
    members = assign_rows(sizes, rows=-(-B // SAMPLES_PER_ROW))
    row_of, start, length = [0] * B, [0] * B, 0
    for row, samples in enumerate(members):
        offset = 0
        for sample in samples:
            row_of[sample], start[sample] = row, offset
            offset += sizes[sample]
        length = max(length, offset)  # the rows are as long as the fullest one
    rows = len(members)
    device = lengths.device
    step = torch.arange(T, device=device)
    real = step < lengths[:, None]  # (B, T)
    packed_at = (torch.tensor(row_of, device=device) * length + torch.tensor(start, device=device))[:, None] + step
    target = torch.where(real, packed_at, rows * length).flatten()
    real = real.flatten()
    kept = packed_at.flatten()[real]  # where each token went, in the batch's order
    source = torch.full((rows * length,), B * T, dtype=torch.long, device=device)
    source[kept] = torch.arange(B * T, device=device)[real]
    position_ids = torch.zeros(rows * length, dtype=torch.long, device=device)
    position_ids[kept] = step.expand(B, T).flatten()[real]
    return Packing(rows, length, position_ids.view(rows, length), source, target)


def pack(x: Tensor, packing: Packing) -> Tensor:
    """(B, T, H) right-padded -> (rows, length, H) packed (padding zeros)."""
    flat = torch.cat([x.flatten(0, 1), x.new_zeros(1, x.shape[-1])])
    return flat[packing.source].view(packing.rows, packing.length, -1)


def unpack(packed: Tensor, packing: Packing, batch: int) -> Tensor:
    """(rows, length, H) packed -> (B, T, H) in the padded layout (padding zeros)."""
    flat = torch.cat([packed.flatten(0, 1), packed.new_zeros(1, packed.shape[-1])])
    return flat[packing.target].view(batch, -1, packed.shape[-1])
