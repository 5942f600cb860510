"""The stage-1 losses as formulated before image keys/values were shared, kept as the reference that
`qformer.losses.stage1_losses` must equal: every ITM pair carries its own copy of its image's ln_vision
outputs, so every pass projects its image to cross-attention keys/values again, every padded text position
goes through the feed-forward layers, and the ITG head projects every position onto the vocabulary and ignores
the padding in the loss.

Also used by `benchmarks/run.py` to time the previous formulation side by side with the current one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qformer.losses import Gather, Stage1Losses, itc_loss, itm_loss, no_gather, positives, sample_hard_negatives
from qformer.masks import generation_mask, padding_mask, with_queries


# The model's three text passes as they were: the Q-Former computes every text position, padding included.
def reference_text_feat(model, input_ids, attention_mask):
    hidden = model.qformer(input_ids, padding_mask(attention_mask), use_queries=False).last_hidden_state
    return F.normalize(model.text_proj(hidden[:, 0]), dim=-1)


def reference_itm_logits(model, image_embeds, input_ids, attention_mask):
    Q = model.qformer.num_query_tokens
    hidden = model.qformer(input_ids, padding_mask(with_queries(Q, attention_mask)), image_embeds=image_embeds).last_hidden_state
    return model.itm_head(hidden[:, :Q]).mean(dim=1)


def reference_itg_logits(model, input_ids, attention_mask, query_kv):
    Q = model.qformer.num_query_tokens
    mask = generation_mask(Q, attention_mask)[:, :, Q:]
    hidden = model.qformer(input_ids, mask, use_queries=False, past_query_kv=query_kv).last_hidden_state
    return model.lm_head(hidden, model.qformer.embeddings.word_embeddings.weight)


def reference_itm_pairs(sim_i2t, sim_t2i, image_embeds, input_ids, attention_mask, image_ids, gather, rank):
    image_embeds_all, ids_all, mask_all = gather(image_embeds), gather(input_ids), gather(attention_mask)
    positive = positives(image_ids, len(input_ids), gather, rank, input_ids.device)
    neg_image, has_neg_image = sample_hard_negatives(sim_t2i, positive)
    neg_text, has_neg_text = sample_hard_negatives(sim_i2t, positive)
    images = torch.cat([image_embeds, image_embeds_all[neg_image][has_neg_image], image_embeds[has_neg_text]])
    ids = torch.cat([input_ids, input_ids[has_neg_image], ids_all[neg_text][has_neg_text]])
    masks = torch.cat([attention_mask, attention_mask[has_neg_image], mask_all[neg_text][has_neg_text]])
    labels = torch.cat([torch.ones_like(input_ids[:, 0]), torch.zeros_like(ids[len(input_ids):, 0])])
    return images, ids, masks, labels


def reference_itg_loss(logits, input_ids, attention_mask, label_smoothing=0.1):
    labels = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


def reference_stage1_losses(model, pixel_values, input_ids, attention_mask, image_ids, dec_token_id,
                            gather: Gather = no_gather, rank: int = 0) -> Stage1Losses:
    image_embeds = model.encode_image(pixel_values)
    query = model.query_forward(image_embeds)
    image_feats = model.image_feats(query.last_hidden_state)
    text_feat = reference_text_feat(model, input_ids, attention_mask)
    itc, sim_i2t, sim_t2i = itc_loss(image_feats, text_feat, model.temp, image_ids, gather, rank)
    pairs = reference_itm_pairs(sim_i2t, sim_t2i, image_embeds, input_ids, attention_mask, image_ids, gather, rank)
    itm = itm_loss(reference_itm_logits(model, *pairs[:3]), pairs[3])
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = dec_token_id
    logits = reference_itg_logits(model, decoder_ids, attention_mask, query.query_kv)
    itg = reference_itg_loss(logits, decoder_ids, attention_mask)
    return Stage1Losses(itc=itc, itm=itm, itg=itg, image_embeds=image_embeds, image_feats=image_feats, text_feat=text_feat)


@torch.no_grad()
def reference_rerank(model, features, sim, k, batch_size=128, progress=lambda x: x):
    """The re-rank before the change: every (row, top-k candidate) pair scored separately in each direction, every
    pair with its own copy of its image (so its keys/values projected again). One process."""
    I, T = sim.shape
    pairs = [(i, t, 0) for i in range(I) for t in sim[i].topk(min(k, T)).indices.tolist()]
    pairs += [(i, t, 1) for t in range(T) for i in sim[:, t].topk(min(k, I)).indices.tolist()]
    scores = torch.zeros(2, I, T, device=sim.device)
    filled = torch.zeros(2, I, T, device=sim.device)
    for start in progress(range(0, len(pairs), batch_size)):
        chunk = torch.tensor(pairs[start:start + batch_size], device=sim.device)
        images, texts, direction = chunk[:, 0], chunk[:, 1], chunk[:, 2]
        logits = reference_itm_logits(model, features.image_embeds[images], features.input_ids[texts], features.attention_mask[texts])
        scores[direction, images, texts] = logits[:, 1].float() + sim[images, texts]
        filled[direction, images, texts] = 1.0
    scores = scores.masked_fill(filled == 0, -100.0)
    return scores[0], scores[1].T
