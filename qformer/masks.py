"""Attention masks for the Q-Former's four stage-1 modes.

Every mask is boolean, shaped (B, 1, rows, keys) for `scaled_dot_product_attention`, True = may attend.
Padding only hides keys: a padded position still computes an output, which the losses ignore.

| mode                      | input            | mask                                      |
|---------------------------|------------------|-------------------------------------------|
| ITC image (queries only)  | Q queries        | None (all queries see each other)         |
| ITC text (text only)      | L text tokens    | `padding_mask(text_mask)`                 |
| ITM (bidirectional)       | Q + L            | `padding_mask(cat(ones(Q), text_mask))`   |
| ITG (causal text)         | Q + L            | `generation_mask(Q, text_mask)`           |

For ITG over cached query keys/values, pass only the text rows: `generation_mask(Q, text_mask)[:, :, Q:]`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def padding_mask(key_mask: Tensor) -> Tensor:
    """(B, S) 1/0 or bool, 1 = real token -> (B, 1, 1, S): every row sees every real key."""
    return key_mask.bool()[:, None, None, :]


def with_queries(num_queries: int, text_mask: Tensor) -> Tensor:
    """(B, L) text mask -> (B, Q + L) key mask where all queries are real tokens."""
    ones = torch.ones(text_mask.shape[0], num_queries, dtype=torch.bool, device=text_mask.device)
    return torch.cat([ones, text_mask.bool()], dim=1)


def generation_mask(num_queries: int, text_mask: Tensor) -> Tensor:
    """The ITG mask over [queries ; text], (B, 1, Q + L, Q + L).

    Queries see all queries and no text (so they must carry what the text needs);
    text sees all queries and the real text tokens up to and including itself.
    """
    B, L = text_mask.shape
    T = num_queries + L
    device = text_mask.device
    keys = with_queries(num_queries, text_mask)[:, None, None, :]  # (B, 1, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    causal[:, :num_queries] = True  # everyone sees every query ...
    causal[:num_queries, num_queries:] = False  # ... and queries never see text
    return causal[None, None] & keys  # (B, 1, T, T)
