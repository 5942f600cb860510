"""Image-text retrieval scores as LAVIS computes them (`compute_sim_matrix`), at COCO scale and shardable.

1. image features (query outputs) and text features ([CLS]) are computed once each, in fixed chunks
   (an unreadable image is marked, so it can be dropped before ranking);
2. ITC similarity = max over queries of the cosine, for every image-text pair;
3. for every image its top-k texts, and for every text its top-k images, are re-scored with
   ITM positive logit + ITC similarity; every other entry is -100.

The re-rank scores each distinct (image, text) pair once, though a pair is often in both an image's and a
text's top k (the ITM logit does not depend on the direction), `batch_size` pairs at a time. Pairs are sorted
by image, so a batch holds few distinct images, and each of them is projected to cross-attention keys/values
once for all its pairs. Work is split over processes by a `WorkShare` (chunk c and pair batch p go to rank
c % world / p % world) and put together by its `reduce_sum`, a sum over processes (identity for one). Every
entry is computed by exactly one process and the others add exact zeros, and the batches do not depend on
the number of processes, so any number of processes gives the same bits as one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from qformer.stage1 import Stage1Model
from qformer.workshare import WorkShare

NOT_RANKED = -100.0


@dataclass
class RetrievalFeatures:
    image_embeds: Tensor  # (I, N, Dv) ln_vision outputs, for the ITM re-rank
    image_feats: Tensor  # (I, Q, E)
    text_feat: Tensor  # (T, E)
    input_ids: Tensor  # (T, L)
    attention_mask: Tensor  # (T, L)


@torch.no_grad()
def image_features(model: Stage1Model, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 3, H, W) -> (image_embeds (B, N, Dv), image_feats (B, Q, E)): what ITM re-ranks and what ITC ranks."""
    image_embeds = model.encode_image(pixels)
    return image_embeds, model.image_feats(model.query_forward(image_embeds).last_hidden_state)


@torch.no_grad()
def compute_image_features(
    model: Stage1Model,
    load_chunk: Callable[[int], tuple[Tensor | None, list[int]]],  # chunk -> (pixels of its readable images, their rows)
    chunk_sizes: list[int],  # images per chunk (fixed boundaries, whatever the number of processes)
    share: WorkShare = WorkShare(),
    progress: Callable[[Iterable], Iterable] = lambda x: x,
) -> tuple[Tensor, Tensor, Tensor]:
    """(image_embeds (I, N, Dv), image_feats (I, Q, E), readable (I,) bool) of every image.

    Each image is decoded once, by the process that owns its chunk; an unreadable one keeps zero rows and
    `readable` False, so the caller can drop it before anything is ranked.
    """
    device = next(model.parameters()).device
    starts = [sum(chunk_sizes[:i]) for i in range(len(chunk_sizes))]
    total = sum(chunk_sizes)
    size = model.config.vision_config.image_size
    probe = model.encode_image(torch.zeros(1, 3, size, size, device=device))  # shapes, without reading any file
    embeds = probe.new_zeros(total, *probe.shape[1:])
    feats = probe.new_zeros(total, model.qformer.num_query_tokens, model.vision_proj.out_features)
    readable = torch.zeros(total, device=device)
    for c in progress(share.owned(len(chunk_sizes))):
        pixels, kept = load_chunk(c)
        if pixels is None:
            continue
        rows = torch.tensor(kept, device=device) + starts[c]
        embeds[rows], feats[rows] = image_features(model, pixels.to(device))
        readable[rows] = 1.0
    return share.reduce_sum(embeds), share.reduce_sum(feats), share.reduce_sum(readable) > 0


@torch.no_grad()
def compute_text_features(
    model: Stage1Model,
    input_ids: Tensor,
    attention_mask: Tensor,
    text_chunk: int = 256,
    share: WorkShare = WorkShare(),
) -> Tensor:
    """(T, E) [CLS] features of every text; each process computes its chunks, the share's sum shares them."""
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    text_feat = torch.zeros(len(input_ids), model.text_proj.out_features, device=device)
    for c in share.owned((len(input_ids) + text_chunk - 1) // text_chunk):
        rows = slice(c * text_chunk, (c + 1) * text_chunk)
        text_feat[rows] = model.text_feat(input_ids[rows], attention_mask[rows])
    return share.reduce_sum(text_feat)


@torch.no_grad()
def itc_similarity(image_feats: Tensor, text_feat: Tensor, chunk: int = 1024) -> Tensor:
    """(I, Q, E), (T, E) -> (I, T): max over queries of the cosine, a chunk of images at a time.

    Image features stored in a narrower dtype (a search index keeps fp16) are widened one chunk at a time.
    """
    return torch.cat([Stage1Model.itc_similarity(image_feats[i : i + chunk].to(text_feat), text_feat)
                      for i in range(0, len(image_feats), chunk)])


@torch.no_grad()
def rerank(
    model: Stage1Model,
    features: RetrievalFeatures,
    sim: Tensor,  # (I, T) ITC similarity
    k: int,
    batch_size: int = 128,
    share: WorkShare = WorkShare(),
    progress: Callable[[Iterable], Iterable] = lambda x: x,
) -> tuple[Tensor, Tensor]:
    """ITM re-rank of each row's top-k: (score_i2t (I, T), score_t2i (T, I)), NOT_RANKED elsewhere."""
    in_i2t, in_t2i = top_k_pairs(sim, k)  # (I, T) each
    pairs = (in_i2t | in_t2i).nonzero()  # (P, 2) distinct (image, text) pairs, sorted by image
    itm = torch.zeros_like(sim)  # (I, T) ITM positive logit of every pair scored
    batches = range(0, len(pairs), batch_size)
    for start in progress([batches[b] for b in share.owned(len(batches))]):
        images, texts = pairs[start : start + batch_size].unbind(1)
        distinct, index = images.unique_consecutive(return_inverse=True)
        image_kv = model.image_kv(features.image_embeds[distinct]).select(index)  # each image projected once
        logits = model.itm_logits(image_kv, features.input_ids[texts], features.attention_mask[texts])
        itm[images, texts] = logits[:, 1].float()
    itm = share.reduce_sum(itm)
    score_i2t = torch.where(in_i2t, itm + sim, NOT_RANKED)
    score_t2i = torch.where(in_t2i, itm + sim, NOT_RANKED)
    return score_i2t, score_t2i.T


@torch.no_grad()
def match_scores(model: Stage1Model, image_embeds: Tensor, image_feats: Tensor, input_ids: Tensor,
                 attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """K images (`image_features` of them) against one text (`input_ids`, `attention_mask` (1, L)):
    (ITM logits (K, 2), ITC similarity (K,)).

    The re-rank score is the positive logit plus the similarity, as in `rerank`; the match probability is the
    softmax of the logits.
    """
    K = len(image_embeds)
    text_feat = model.text_feat(input_ids, attention_mask)  # (1, E)
    logits = model.itm_logits(image_embeds, input_ids.expand(K, -1), attention_mask.expand(K, -1))  # (K, 2)
    return logits.float(), Stage1Model.itc_similarity(image_feats, text_feat)[:, 0]


def top_k_pairs(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(I, T) -> which pairs are among each image's top-k texts, and among each text's top-k images (bool, (I, T))."""
    I, T = sim.shape
    in_i2t = torch.zeros(I, T, dtype=torch.bool, device=sim.device)
    in_t2i = torch.zeros_like(in_i2t)
    in_i2t.scatter_(1, sim.topk(min(k, T), dim=1).indices, True)
    in_t2i.scatter_(0, sim.topk(min(k, I), dim=0).indices, True)
    return in_i2t, in_t2i


def itc_only_scores(sim: Tensor) -> tuple[Tensor, Tensor]:
    """Ranking by ITC alone (`--itc-only`): the similarity itself, both ways."""
    return sim, sim.T


def discard_nonfinite(score_i2t: Tensor, score_t2i: Tensor, image_feats: Tensor, text_feat: Tensor) -> tuple[int, int]:
    """Images and texts whose features hold NaN/inf (a diverged model) never score: every score they take part in
    becomes NaN, which recall never counts as a hit, even where the re-rank left a finite -100. In place; returns
    (bad images, bad texts)."""
    bad_images = ~torch.isfinite(image_feats.flatten(1)).all(1)  # (I,)
    bad_texts = ~torch.isfinite(text_feat).all(1)  # (T,)
    for scores, rows, columns in ((score_i2t, bad_images, bad_texts), (score_t2i, bad_texts, bad_images)):
        scores[rows.to(scores.device)] = float("nan")
        scores[:, columns.to(scores.device)] = float("nan")
    return int(bad_images.sum()), int(bad_texts.sum())
