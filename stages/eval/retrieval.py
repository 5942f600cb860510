"""`qformer eval retrieval`: the paper's image-text retrieval (ITC shortlist, ITM re-rank), recall@1/5/10 both ways."""

from __future__ import annotations

import sys

import torch

from qformer.retrieval import RetrievalFeatures
from qformer.workshare import WorkShare
from stages.data.annotations import clean_caption
from stages.eval.common import EvalOptions, EvalSet, print_scores, progress, setup_processes
from stages.eval.metrics import retrieval_recalls
from stages.outputs import check_output_files, write_json


# --- retrieval ----------------------------------------------------------------------------------------
def evaluate_retrieval(model, tokenizer, data: EvalSet, k_test: int = 128, itc_only: bool = False, batch_size: int = 64,
                       share: WorkShare = WorkShare(), show_progress: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Recall@1/5/10 both ways (+ the score matrices over the readable images) of a stage-1 model.

    Images are read once; unreadable ones are dropped with their captions before anything is ranked.
    `nonfinite_features` counts images and texts whose features hold NaN/inf (a diverged model): their
    scores never count as hits.
    """
    from qformer.retrieval import (
        compute_image_features,
        compute_text_features,
        discard_nonfinite,
        itc_only_scores,
        itc_similarity,
        rerank,
    )
    from qformer.transforms import eval_transform

    if k_test < 1 or batch_size < 1:
        raise ValueError(f"--k-test and --batch-size must be at least 1, got {k_test} and {batch_size}")

    model.eval()
    transform = eval_transform(model.config.vision_config.image_size)
    starts = list(range(0, len(data.entries), batch_size))
    sizes = [len(data.entries[s : s + batch_size]) for s in starts]
    embeds, feats, readable = compute_image_features(
        model, lambda c: data.reader.load([e.image for e in data.entries[starts[c] : starts[c] + sizes[c]]], transform), sizes,
        share, progress(show_progress and share.is_main, "image features"))
    skipped = data.unreadable(share)
    kept = readable.nonzero().flatten().tolist()
    if not kept:
        raise data.nothing_readable()
    entries = [data.entries[i] for i in kept]
    texts, txt2img, img2txt = [], [], []
    for i, entry in enumerate(entries):
        img2txt.append(list(range(len(texts), len(texts) + len(entry.captions))))
        for caption in entry.captions:
            texts.append(clean_caption(caption))
            txt2img.append(i)
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=model.config.max_text_length, return_tensors="pt")
    rows = torch.tensor(kept, device=embeds.device)
    input_ids, attention_mask = tokens["input_ids"].to(embeds.device), tokens["attention_mask"].to(embeds.device)
    text_feat = compute_text_features(model, input_ids, attention_mask, batch_size, share)
    features = RetrievalFeatures(embeds[rows], feats[rows], text_feat, input_ids, attention_mask)
    sim = itc_similarity(features.image_feats, features.text_feat)
    if itc_only:
        score_i2t, score_t2i = itc_only_scores(sim)
    else:
        score_i2t, score_t2i = rerank(model, features, sim, k_test, batch_size, share,
                                      progress(show_progress and share.is_main, f"ITM re-rank (k={k_test})"))
    bad_images, bad_texts = discard_nonfinite(score_i2t, score_t2i, features.image_feats, features.text_feat)
    if (bad_images or bad_texts) and share.is_main:
        print(f"warning: the model gives non-finite features for {bad_images} of {len(entries)} images and {bad_texts} of "
              f"{len(texts)} texts (diverged weights?); their scores never count as hits", file=sys.stderr)
    result = retrieval_recalls(score_i2t.cpu(), score_t2i.cpu(), img2txt, txt2img)
    result.update(images=len(entries), texts=len(texts), skipped_images=skipped, nonfinite_features=bad_images + bad_texts)
    return result, score_i2t, score_t2i


def eval_retrieval(
    *,
    model: str,
    options: EvalOptions,
    k_test: int = 128,
    itc_only: bool = False,
    save_scores: str | None = None,
) -> int:
    """Image-text retrieval recall@1/5/10 both ways of a stage-1 model: ITC shortlist, ITM re-rank (as LAVIS).

    Exit status 1 when the model's features are not finite (diverged weights: everything then scores 0).

    Args:
        model: a stage-1 export folder.
        options: the options every evaluation takes (--data, --images, --features, --batch-size, --device, ...).
        k_test: candidates re-ranked with ITM per query.
        itc_only: rank by ITC similarity alone.
        save_scores: torch file with both score matrices (-100 outside each top-k).
    """
    from qformer.folders import load_stage1

    check_output_files(json=options.json, save_scores=save_scores)
    share, torch_device = setup_processes(options.device)
    stage1, tokenizer = load_stage1(model)
    evalset = options.load_set(stage1.visual_encoder)
    scores, i2t, t2i = evaluate_retrieval(stage1.to(torch_device), tokenizer, evalset, k_test, itc_only, options.batch_size, share,
                                          not options.no_progress)
    if share.is_main:
        if save_scores:
            torch.save({"score_i2t": i2t.cpu(), "score_t2i": t2i.cpu()}, save_scores)
        print_scores(f"retrieval on {options.data} ({'ITC only' if itc_only else f'ITC top-{k_test} + ITM re-rank'})", scores)
        write_json(options.json, scores)
    if scores["nonfinite_features"]:
        print(f"qformer eval retrieval: error: the model gives non-finite features ({scores['nonfinite_features']} images/texts): "
              "its weights have diverged", file=sys.stderr)
        return 1
    return 0
