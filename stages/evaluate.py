"""The paper's retrieval and captioning evaluations on any annotation file: `qformer eval retrieval | caption`
(zero-shot VQA is `stages.vqa`).

Each runs on one process, or sharded over several when started with `torchrun` (results are identical).
Entries showing the same image are evaluated as one image with all their captions. Each image is read
once; a missing or unreadable one is named once on stderr, skipped and counted in the output.
"""

from __future__ import annotations

import json as json_io
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qformer.retrieval import RetrievalFeatures
from qformer.shard import Shard
from qformer.stage2 import CAPTION_GENERATION, CAPTION_PROMPT, GenerationSettings
from stages.annotations import Entry, clean_caption, load_annotations
from stages.distributed import current_shard, device_for, gather_objects, init_distributed
from stages.generation import generate_for_images
from stages.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader
from stages.metrics import caption_metrics, retrieval_recalls


class NoReadableImage(ValueError):
    """Every image of an evaluation set was unreadable."""


# --- data ---------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One entry per distinct image (entries of the same image merged); its images are read when used."""

    entries: list[Entry]
    reader: ImageReader  # or a `stages.feature_cache.FeatureReader`: the eval view of each image, from a cache

    @classmethod
    def load(cls, annotations: str, image_root: str | None, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
             allow_outside_root: bool = False, features: str | None = None, encoder=None) -> "EvalSet":
        """The images are read from `image_root`, or their tokens from the feature cache `features` (checked against `encoder`)."""
        from stages.feature_cache import image_source
        from stages.shards import is_shard_spec, shard_eval_set

        if is_shard_spec(annotations):
            if features is not None:
                raise ValueError("--features: a feature cache is read with an annotation file, not with shards (--data)")
            return cls(*shard_eval_set(annotations, "--data", max_image_pixels))
        entries = load_annotations(annotations, allow_outside_root)
        reader = image_source(image_root, features, encoder, [e.image for e in entries], annotations, max_image_pixels, allow_outside_root)
        return cls(entries, reader)

    @property
    def image_root(self) -> Path:
        return self.reader.root

    def unreadable(self, shard: Shard) -> int:
        """Unreadable images over all processes (each image is read, and so counted, by one process only)."""
        count = len({path for part in gather_objects(list(self.reader.skipped.reasons)) for path in part}) if shard.world > 1 else len(self.reader.skipped)
        self.reader.skipped.finish(count if shard.is_main else len(self.reader.skipped))
        return count

    def nothing_readable(self) -> NoReadableImage:
        where = f"under {self.image_root}" if self.image_root is not None else "in its shards"
        return NoReadableImage(f"no readable image among the {len(self.entries)} of the evaluation set {where}")


def progress(enabled: bool, desc: str):
    return lambda items: tqdm(items, desc=desc, disable=not enabled, file=sys.stderr)


# --- retrieval ----------------------------------------------------------------------------------------
def evaluate_retrieval(model, tokenizer, data: EvalSet, k_test: int = 128, itc_only: bool = False, batch_size: int = 64,
                       shard: Shard = Shard(), show_progress: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Recall@1/5/10 both ways (+ the score matrices over the readable images) of a stage-1 model.

    Images are read once; unreadable ones are dropped with their captions before anything is ranked.
    `nonfinite_features` counts images and texts whose features hold NaN/inf (a diverged model): their
    scores never count as hits.
    """
    from qformer.retrieval import (compute_image_features, compute_text_features, discard_nonfinite, itc_only_scores,
                                   itc_similarity, rerank)
    from stages.data import eval_transform

    if k_test < 1 or batch_size < 1:
        raise ValueError(f"--k-test and --batch-size must be at least 1, got {k_test} and {batch_size}")

    model.eval()
    transform = eval_transform(model.config.vision_config.image_size)
    starts = list(range(0, len(data.entries), batch_size))
    sizes = [len(data.entries[s : s + batch_size]) for s in starts]
    embeds, feats, readable = compute_image_features(
        model, lambda c: data.reader.load([e.image for e in data.entries[starts[c] : starts[c] + sizes[c]]], transform), sizes,
        shard, progress(show_progress and shard.is_main, "image features"))
    skipped = data.unreadable(shard)
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
    text_feat = compute_text_features(model, input_ids, attention_mask, batch_size, shard)
    features = RetrievalFeatures(embeds[rows], feats[rows], text_feat, input_ids, attention_mask)
    sim = itc_similarity(features.image_feats, features.text_feat)
    if itc_only:
        score_i2t, score_t2i = itc_only_scores(sim)
    else:
        score_i2t, score_t2i = rerank(model, features, sim, k_test, batch_size, shard,
                                      progress(show_progress and shard.is_main, f"ITM re-rank (k={k_test})"))
    bad_images, bad_texts = discard_nonfinite(score_i2t, score_t2i, features.image_feats, features.text_feat)
    if (bad_images or bad_texts) and shard.is_main:
        print(f"warning: the model gives non-finite features for {bad_images} of {len(entries)} images and {bad_texts} of "
              f"{len(texts)} texts (diverged weights?); their scores never count as hits", file=sys.stderr)
    result = retrieval_recalls(score_i2t.cpu(), score_t2i.cpu(), img2txt, txt2img)
    result.update(images=len(entries), texts=len(texts), skipped_images=skipped, nonfinite_features=bad_images + bad_texts)
    return result, score_i2t, score_t2i


# --- captioning ---------------------------------------------------------------------------------------
def generate_captions(model, tokenizer, data: EvalSet, prompt: str, batch_size: int, settings: GenerationSettings,
                      shard: Shard = Shard(), show_progress: bool = True) -> dict[str, str]:
    """{image id: caption} for every readable image; with several processes each captions its share, then all are gathered."""
    mine = data.entries[shard.rank :: shard.world]
    texts = generate_for_images(model, tokenizer, [e.image for e in mine], [[prompt]] * len(mine), data.reader, settings,
                                batch_size, progress(show_progress and shard.is_main, "captions"))
    captions = {entry.image_id: text[0] for entry, text in zip(mine, texts) if text is not None}
    return {k: v for part in gather_objects(captions) for k, v in part.items()}


def evaluate_captions(model, tokenizer, data: EvalSet, prompt: str, batch_size: int, settings: GenerationSettings,
                      shard: Shard = Shard(), show_progress: bool = True) -> tuple[dict, dict[str, str], list[str]]:
    """Caption scores against every reference caption of each readable image."""
    captions = generate_captions(model, tokenizer, data, prompt, batch_size, settings, shard, show_progress)
    skipped = data.unreadable(shard)
    if not captions:
        raise data.nothing_readable()
    references = {e.image_id: [clean_caption(c) for c in e.captions] for e in data.entries if e.image_id in captions}
    scores, notices = caption_metrics(captions, references)
    scores.update(images=len(captions), skipped_images=skipped)
    return scores, captions, notices


# --- the commands -----------------------------------------------------------------------------------------
def print_scores(title: str, scores: dict) -> None:
    print(title)
    width = max(len(k) for k in scores)
    for key, value in scores.items():
        print(f"  {key:<{width}}  {value:.2f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


def check_output_files(**paths: str | None) -> None:
    """Fail before any work when a result file could not be written (its folder is missing, or it is a folder)."""
    for option, path in paths.items():
        if path is None:
            continue
        if Path(path).is_dir() or not Path(path).parent.is_dir():
            raise ValueError(f"--{option.replace('_', '-')} {path}: " + ("is a folder" if Path(path).is_dir() else "its folder does not exist"))


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json_io.dumps(data, indent=2) + "\n")


def _setup(device: str) -> tuple[Shard, torch.device]:
    rank, _ = init_distributed(device)
    return current_shard(), device_for(device, rank)


def eval_retrieval(
    *,
    model: str,
    data: str,
    images: str | None = None,
    features: str | None = None,
    k_test: int = 128,
    itc_only: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    json: str | None = None,
    save_scores: str | None = None,
    no_progress: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_outside_root: bool = False,
) -> int:
    """Image-text retrieval recall@1/5/10 both ways of a stage-1 model: ITC shortlist, ITM re-rank (as LAVIS).

    Exit status 1 when the model's features are not finite (diverged weights: everything then scores 0).

    Args:
        model: a stage-1 export folder.
        data: annotation file (LAVIS / COCO-Karpathy list, or official COCO captions), or webdataset shards
            (`DIR/{00000..00009}.tar`, img2dataset's layout; read into memory, no --images needed).
        images: image root folder the annotation paths are relative to.
        features: read the images' eval view from this feature cache (qformer cache-features) instead of --images.
        k_test: candidates re-ranked with ITM per query.
        itc_only: rank by ITC similarity alone.
        batch_size: images (and ITM pairs) per batch.
        device: cpu, cuda or cuda:N (one GPU per process under torchrun).
        json: also write the scores to this JSON file.
        save_scores: torch file with both score matrices (-100 outside each top-k).
        no_progress: no progress bars.
        max_image_pixels: skip images whose header declares more pixels, before decoding.
        allow_outside_root: read annotation paths that lead outside --images (absolute, '..', symbolic links).
    """
    from qformer.export import load_stage1

    check_output_files(json=json, save_scores=save_scores)
    shard, torch_device = _setup(device)
    stage1, tokenizer = load_stage1(model)
    evalset = EvalSet.load(data, images, max_image_pixels, allow_outside_root, features, stage1.visual_encoder)
    scores, i2t, t2i = evaluate_retrieval(stage1.to(torch_device), tokenizer, evalset, k_test, itc_only, batch_size, shard, not no_progress)
    if shard.is_main:
        if save_scores:
            torch.save({"score_i2t": i2t.cpu(), "score_t2i": t2i.cpu()}, save_scores)
        print_scores(f"retrieval on {data} ({'ITC only' if itc_only else f'ITC top-{k_test} + ITM re-rank'})", scores)
        write_json(json, scores)
    if scores["nonfinite_features"]:
        print(f"qformer eval retrieval: error: the model gives non-finite features ({scores['nonfinite_features']} images/texts): "
              "its weights have diverged", file=sys.stderr)
        return 1
    return 0


def eval_caption(
    *,
    model: str,
    data: str,
    images: str | None = None,
    features: str | None = None,
    prompt: str = CAPTION_PROMPT,
    generation: GenerationSettings = CAPTION_GENERATION,
    batch_size: int = 64,
    device: str = "cpu",
    json: str | None = None,
    predictions: str | None = None,
    no_progress: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_outside_root: bool = False,
) -> int:
    """Captioning scores of a stage-2 model: BLEU-1..4, CIDEr, ROUGE-L (+ METEOR when Java runs).

    Args:
        model: a stage-2 export folder.
        data: annotation file whose captions are the references, or webdataset shards (as eval retrieval).
        images: image root folder the annotation paths are relative to.
        features: read the images' eval view from this feature cache (qformer cache-features) instead of --images.
        prompt: text every caption continues.
        generation: beam search settings (COCO evaluation: beam 5, 8 to 30 tokens).
        batch_size: images per generation batch.
        device: cpu, cuda or cuda:N (one GPU per process under torchrun).
        json: also write the scores to this JSON file.
        predictions: write the generated captions to this JSON file ([{"image_id", "caption"}]).
        no_progress: no progress bars.
        max_image_pixels: skip images whose header declares more pixels, before decoding.
        allow_outside_root: read annotation paths that lead outside --images (absolute, '..', symbolic links).
    """
    from qformer.export import load_stage2

    check_output_files(json=json, predictions=predictions)
    shard, torch_device = _setup(device)
    stage2, tokenizer = load_stage2(model)
    evalset = EvalSet.load(data, images, max_image_pixels, allow_outside_root, features, stage2.visual_encoder)
    scores, captions, notices = evaluate_captions(stage2.to(torch_device), tokenizer, evalset, prompt, batch_size, generation, shard,
                                                  not no_progress)
    if shard.is_main:
        for notice in notices:
            print(f"note: {notice}", file=sys.stderr)
        source_ids = {e.image_id: e.image_id if e.source_id is None else e.source_id for e in evalset.entries}
        write_json(predictions, [{"image_id": source_ids[k], "caption": v} for k, v in captions.items()])  # ids as in the file
        print_scores(f"captioning on {data}", scores)
        write_json(json, scores)
    return 0
