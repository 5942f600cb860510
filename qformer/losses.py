"""Stage-1 losses: ITC, ITM (hard negatives) and ITG, as functions you can test alone.

Cross-rank communication is passed in as `gather`: a function (B, ...) -> (world * B, ...) that
concatenates every rank's rows in rank order and lets gradients flow back to their owners
(`stages.distributed.all_gather_with_grad` in training). With one process it is the identity, so
nothing here needs a process group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qformer.qformer import ImageKV

Gather = Callable[[Tensor], Tensor]


def no_gather(x: Tensor) -> Tensor:
    return x


@dataclass
class Stage1Losses:
    itc: Tensor
    itm: Tensor
    itg: Tensor
    # The features the losses were built from, for callers that need them too (validation's retrieval recall):
    image_embeds: Tensor | None = None  # (B, N, Dv) ln_vision outputs
    image_feats: Tensor | None = None  # (B, Q, E)
    text_feat: Tensor | None = None  # (B, E)

    @property
    def total(self) -> Tensor:
        return self.itc + self.itm + self.itg  # the paper weighs the three 1:1:1


def positives(image_ids: Tensor | None, batch: int, gather: Gather, rank: int, device) -> Tensor:
    """(B, G) bool: which global samples show the same image as each local one.

    Without image ids every sample is its own image: the positive of local row b is global column rank * B + b.
    """
    if image_ids is None:
        image_ids = rank * batch + torch.arange(batch, device=device)
    return image_ids[:, None] == gather(image_ids)[None, :]


def itc_loss(
    image_feats: Tensor,  # (B, Q, E) unit-norm query features of the local images
    text_feat: Tensor,  # (B, E) unit-norm [CLS] features of the local texts
    temp: Tensor,  # scalar temperature
    image_ids: Tensor | None = None,  # (B,) same id = same image; None = all different
    gather: Gather = no_gather,
    rank: int = 0,
    label_smoothing: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Image-text contrastive loss over the global batch. Returns (loss, sim_i2t (B, G), sim_t2i (B, G)).

    Similarity = max over queries of the cosine, divided by temp. Every same-image pair is a positive;
    targets are (1 - s) * positives / count + s / G, which is cross-entropy with label smoothing s
    when each sample has one positive.
    """
    image_feats_all, text_feat_all = gather(image_feats), gather(text_feat)  # (G, Q, E), (G, E)
    sim_i2t = torch.einsum("bqe,ge->bgq", image_feats, text_feat_all).amax(-1) / temp  # (B, G)
    sim_t2i = torch.einsum("be,gqe->bgq", text_feat, image_feats_all).amax(-1) / temp  # (B, G)
    pos = positives(image_ids, len(text_feat), gather, rank, text_feat.device).float()
    targets = (1 - label_smoothing) * pos / pos.sum(1, keepdim=True) + label_smoothing / pos.shape[1]
    loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


@torch.no_grad()
def sample_hard_negatives(sim: Tensor, positive: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One negative per row, drawn with probability softmax(sim) over the non-positive columns.

    sim (B, G), positive (B, G) bool -> (index (B,), valid (B,) bool). A row with no non-positive
    column (batch of one, or one image everywhere) is marked invalid. Never NaN: non-finite
    similarities are clamped, and the 1e-4 floor keeps every non-positive column reachable.
    """
    sim = torch.nan_to_num(sim.float(), nan=0.0, posinf=1e4, neginf=-1e4)
    weights = (F.softmax(sim, dim=1) + 1e-4).masked_fill(positive, 0.0)
    valid = weights.sum(1) > 0
    weights[~valid] = 1.0  # placeholder rows; their draws are discarded
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return index, valid


def itm_pairs(
    sim_i2t: Tensor,  # (B, G) from ITC
    sim_t2i: Tensor,  # (B, G)
    input_ids: Tensor,  # (B, L)
    attention_mask: Tensor,  # (B, L)
    image_ids: Tensor | None = None,  # (B,)
    gather: Gather = no_gather,
    rank: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ITM batch: B positives, one hard-negative image per text, one hard-negative text per image.

    Returns, for up to 3B pairs, each pair's image as a row of the global batch (rank * B + b is local
    image b), input_ids, attention_mask and labels (1 = match).
    """
    B = len(input_ids)
    ids_all, mask_all = gather(input_ids), gather(attention_mask)
    positive = positives(image_ids, B, gather, rank, input_ids.device)
    neg_image, has_neg_image = sample_hard_negatives(sim_t2i, positive)  # for each text
    neg_text, has_neg_text = sample_hard_negatives(sim_i2t, positive)  # for each image

    local = rank * B + torch.arange(B, device=input_ids.device)
    image_rows = torch.cat([local, neg_image[has_neg_image], local[has_neg_text]])
    ids = torch.cat([input_ids, input_ids[has_neg_image], ids_all[neg_text][has_neg_text]])
    masks = torch.cat([attention_mask, attention_mask[has_neg_image], mask_all[neg_text][has_neg_text]])
    labels = torch.cat([torch.ones_like(input_ids[:, 0]), torch.zeros_like(ids[B:, 0])])
    return image_rows, ids, masks, labels


def pair_images(
    model,  # qformer.stage1.Stage1Model
    image_embeds: Tensor,  # (B, N, Dv) the local images
    local_kv: ImageKV,  # their keys/values, already projected for the ITC pass
    image_rows: Tensor,  # (P,) rows of the global batch, from `itm_pairs`
    gather: Gather = no_gather,
    rank: int = 0,
) -> ImageKV:
    """The ITM pairs' images as keys/values, each distinct image projected once: the local images reuse the
    ITC pass's projection, and each distinct hard-negative image from another rank (at most B) is projected
    here. Gradients reach ln_vision and the key/value weights of every image's owner exactly as if every
    pair had projected its own copy.
    """
    B = len(image_embeds)
    # Every rank gathers and uses the result (even for no row), so every rank's backward reaches the
    # gather's all-reduce: a rank skipping it would leave the others waiting.
    image_embeds_all = gather(image_embeds)  # (G, N, Dv)
    if image_embeds_all is image_embeds:  # one process: every image is local, nothing to project or concatenate
        return ImageKV(local_kv.layers, image_rows - rank * B)
    is_local = (image_rows >= rank * B) & (image_rows < (rank + 1) * B)
    foreign, foreign_slot = torch.unique(image_rows[~is_local], return_inverse=True)
    foreign_kv = model.image_kv(image_embeds_all[foreign])  # (F, H, N, Dh) per layer, F <= B
    layers = [None if mine is None else (torch.cat([mine[0], theirs[0]]), torch.cat([mine[1], theirs[1]]))
              for mine, theirs in zip(local_kv.layers, foreign_kv.layers)]
    index = image_rows - rank * B
    index[~is_local] = B + foreign_slot
    return ImageKV(layers, index)


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """(P, 2) ITM logits (already averaged over queries), (P,) labels -> cross-entropy."""
    return F.cross_entropy(logits.float(), labels)


def itg_targets(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Position i predicts token i + 1: which positions predict a real token ((B, L) bool) and those tokens ((P,)).

    Only these P positions need the vocabulary projection; padding and the last position never do.
    """
    real_next = attention_mask[:, 1:].bool()  # (B, L - 1)
    positions = torch.zeros_like(attention_mask, dtype=torch.bool)
    positions[:, :-1] = real_next
    return positions, input_ids[:, 1:][real_next]


def itg_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Next-token cross-entropy: logits (P, V) at the positions `itg_targets` picks, targets (P,) their next tokens."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def stage1_losses(
    model,  # qformer.stage1.Stage1Model
    pixel_values: Tensor,  # (B, 3, H, W)
    input_ids: Tensor,  # (B, L) starting with [CLS]
    attention_mask: Tensor,  # (B, L)
    image_ids: Tensor | None,  # (B,) or None when every sample is a different image
    dec_token_id: int,
    gather: Gather = no_gather,
    rank: int = 0,
) -> Stage1Losses:
    """The three stage-1 losses of one batch, sharing one image pass: each image is encoded and projected to
    cross-attention keys/values once, for the ITC pass and every ITM pair it takes part in."""
    image_embeds = model.encode_image(pixel_values)  # (B, N, Dv)
    image_kv = model.image_kv(image_embeds)
    query = model.query_forward(image_kv)
    image_feats = model.image_feats(query.last_hidden_state)
    text_feat = model.text_feat(input_ids, attention_mask)
    itc, sim_i2t, sim_t2i = itc_loss(image_feats, text_feat, model.temp, image_ids, gather, rank)

    image_rows, pair_ids, pair_masks, labels = itm_pairs(sim_i2t, sim_t2i, input_ids, attention_mask, image_ids, gather, rank)
    images = pair_images(model, image_embeds, image_kv, image_rows, gather, rank)
    itm = itm_loss(model.itm_logits(images, pair_ids, pair_masks), labels)

    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = dec_token_id  # [DEC] replaces [CLS]
    positions, targets = itg_targets(decoder_ids, attention_mask)
    logits = model.itg_logits(decoder_ids, attention_mask, query.query_kv, positions)  # reuses the image pass
    itg = itg_loss(logits, targets)
    return Stage1Losses(itc=itc, itm=itm, itg=itg, image_embeds=image_embeds, image_feats=image_feats, text_feat=text_feat)
