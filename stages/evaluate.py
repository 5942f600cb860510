"""`qformer eval retrieval | caption | vqa`: the paper's evaluations on any annotation file.

Each runs on one process, or sharded over several when started with `torchrun` (results are identical).
Entries showing the same image are evaluated as one image with all their captions. Each image is read
once; a missing or unreadable one is named once on stderr, skipped and counted in the output.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from qformer.retrieval import RetrievalFeatures
from stages.data import Entry, clean_caption, eval_transform, load_annotations, read_json
from stages.images import DEFAULT_MAX_IMAGE_PIXELS, OUTSIDE_ROOT_HINT, SkippedImages, escapes_root, load_pixels
from stages.metrics import caption_metrics, retrieval_recalls, vqa_accuracy

log = logging.getLogger(__name__)


# --- processes ---------------------------------------------------------------------------------------
def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world) for a `torchrun` launch (gloo on CPU, nccl on CUDA); (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def device_for(name: str, rank: int) -> torch.device:
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(name)


# --- data ---------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One entry per distinct image (entries of the same image merged); its images are read when used."""

    entries: list[Entry]
    image_root: Path
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    allow_outside_root: bool = False
    skipped: SkippedImages = field(default_factory=SkippedImages)

    @classmethod
    def load(cls, annotations: str, image_root: str, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
             allow_outside_root: bool = False) -> "EvalSet":
        root = Path(image_root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        return cls(load_annotations(annotations, allow_outside_root), root, max_image_pixels, allow_outside_root)

    def load_images(self, entries: list[Entry], image_size: int) -> tuple[torch.Tensor | None, list[int]]:
        """(pixels of the readable images, their indices in `entries`); the others are named once and counted."""
        return load_pixels([e.image for e in entries], eval_transform(image_size), self.skipped, self.max_image_pixels,
                           self.image_root, self.allow_outside_root)


def progress(enabled: bool, desc: str):
    return lambda items: tqdm(items, desc=desc, disable=not enabled, file=sys.stderr)


def skipped_count(skipped: SkippedImages, world: int) -> int:
    """Unreadable images over all processes (each image is read, and so counted, by one process only)."""
    if world == 1:
        return len(skipped)
    parts = [None] * world
    dist.all_gather_object(parts, list(skipped.reasons))
    return len({path for part in parts for path in part})


class NoReadableImage(ValueError):
    """Every image of an evaluation set was unreadable."""


def nonfinite_rows(*features: torch.Tensor) -> list[int]:
    """How many rows of each feature tensor hold NaN or infinity."""
    return [int((~torch.isfinite(f.flatten(1))).any(1).sum()) for f in features]


# --- retrieval ----------------------------------------------------------------------------------------
def evaluate_retrieval(model, tokenizer, data: EvalSet, k_test: int = 128, itc_only: bool = False, batch_size: int = 64,
                       rank: int = 0, world: int = 1, show_progress: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Recall@1/5/10 both ways (+ the score matrices over the readable images) of a stage-1 model.

    Images are read once; unreadable ones are dropped with their captions before anything is ranked.
    `nonfinite_features` counts images and texts whose features hold NaN/inf (a diverged model): their
    scores never count as hits.
    """
    from qformer.retrieval import compute_image_features, compute_text_features, itc_only_scores, itc_similarity, rerank

    model.eval()
    image_size = model.config.vision_config.image_size
    starts = list(range(0, len(data.entries), batch_size))
    sizes = [len(data.entries[s : s + batch_size]) for s in starts]
    embeds, feats, readable = compute_image_features(
        model, lambda c: data.load_images(data.entries[starts[c] : starts[c] + sizes[c]], image_size), sizes, rank, world,
        reduce_sum, progress(show_progress and rank == 0, "image features"))
    skipped = skipped_count(data.skipped, world)
    kept = readable.nonzero().flatten().tolist()
    if not kept:
        raise NoReadableImage(f"no readable image among the {len(data.entries)} of the evaluation set under {data.image_root}")
    entries = [data.entries[i] for i in kept]
    texts, txt2img, img2txt = [], [], []
    for i, entry in enumerate(entries):
        img2txt.append(list(range(len(texts), len(texts) + len(entry.captions))))
        for caption in entry.captions:
            texts.append(clean_caption(caption))
            txt2img.append(i)
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=model.config.max_text_length, return_tensors="pt")
    rows = torch.tensor(kept, device=embeds.device)
    features = RetrievalFeatures(embeds[rows], feats[rows], None, tokens["input_ids"], tokens["attention_mask"])
    features.text_feat = compute_text_features(model, features.input_ids, features.attention_mask, batch_size, rank, world, reduce_sum)
    features.input_ids, features.attention_mask = features.input_ids.to(embeds.device), features.attention_mask.to(embeds.device)
    bad_images, bad_texts = nonfinite_rows(features.image_feats, features.text_feat)
    if (bad_images or bad_texts) and rank == 0:
        print(f"warning: the model gives non-finite features for {bad_images} of {len(entries)} images and {bad_texts} of "
              f"{len(texts)} texts (diverged weights?); their scores never count as hits", file=sys.stderr)
    sim = itc_similarity(features.image_feats, features.text_feat)
    if itc_only:
        score_i2t, score_t2i = itc_only_scores(sim)
    else:
        score_i2t, score_t2i = rerank(model, features, sim, k_test, batch_size, rank, world, reduce_sum,
                                      progress(show_progress and rank == 0, f"ITM re-rank (k={k_test})"))
    result = retrieval_recalls(score_i2t.cpu(), score_t2i.cpu(), img2txt, txt2img)
    result.update(images=len(entries), texts=len(texts), skipped_images=skipped, nonfinite_features=bad_images + bad_texts)
    return result, score_i2t, score_t2i


# --- captioning ---------------------------------------------------------------------------------------
def generate_captions(model, tokenizer, data: EvalSet, prompt: str, batch_size: int, generation: dict, rank: int = 0,
                      world: int = 1, show_progress: bool = True) -> dict[str, str]:
    """{image id: caption} for every readable image; with several processes each captions its share, then all are gathered."""
    from qformer.stage2 import generate_text

    device = next(model.parameters()).device
    mine = data.entries[rank::world]
    captions = {}
    for start in progress(show_progress and rank == 0, "captions")(range(0, len(mine), batch_size)):
        chunk = mine[start : start + batch_size]
        pixels, kept = data.load_images(chunk, model.config.vision_config.image_size)
        if pixels is None:
            continue
        texts = generate_text(model, tokenizer, pixels.to(device), [prompt] * len(kept), **generation)
        captions.update({chunk[i].image_id: text for i, text in zip(kept, texts)})
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, captions)
        captions = {k: v for part in parts for k, v in part.items()}
    return captions


def evaluate_captions(model, tokenizer, data: EvalSet, prompt: str, batch_size: int, generation: dict, rank: int = 0,
                      world: int = 1, show_progress: bool = True) -> tuple[dict, dict[str, str], list[str]]:
    """Caption scores against every reference caption of each readable image."""
    captions = generate_captions(model, tokenizer, data, prompt, batch_size, generation, rank, world, show_progress)
    skipped = skipped_count(data.skipped, world)
    if not captions:
        raise NoReadableImage(f"no readable image among the {len(data.entries)} of the evaluation set under {data.image_root}")
    references = {e.image_id: [clean_caption(c) for c in e.captions] for e in data.entries if e.image_id in captions}
    scores, notices = caption_metrics(captions, references)
    scores.update(images=len(captions), skipped_images=skipped)
    return scores, captions, notices


# --- VQA ------------------------------------------------------------------------------------------------
@dataclass
class Question:
    question_id: object
    image: str
    question: str
    answers: list[str]


def load_questions(path: str, allow_outside_root: bool = False) -> list[Question]:
    """`[{"question_id", "image", "question", "answer": [10 human answers]}]` (LAVIS's VQAv2 eval format)."""
    data = read_json(path, "question file")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of questions like "
                         '[{"question_id": 1, "image": "x.jpg", "question": "...", "answer": ["...", ...]}]')
    questions = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not all(k in item for k in ("image", "question", "answer")):
            raise ValueError(f"{path}: entry {i} needs 'image', 'question' and 'answer' (a list of human answers)")
        if not isinstance(item["image"], str) or not isinstance(item["question"], str):
            raise ValueError(f"{path}: entry {i}: 'image' and 'question' must be strings")
        if not allow_outside_root and escapes_root(item["image"]):
            raise ValueError(f"{path}: entry {i}: image path {item['image']!r} leads outside the image root ({OUTSIDE_ROOT_HINT})")
        answers = item["answer"] if isinstance(item["answer"], list) else [item["answer"]]
        questions.append(Question(item.get("question_id", i), item["image"], item["question"], [str(a) for a in answers]))
    return questions


def evaluate_vqa(model, tokenizer, questions: list[Question], image_root: Path, prompt: str, batch_size: int, generation: dict,
                 show_progress: bool = True, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 allow_outside_root: bool = False) -> tuple[dict, list[dict]]:
    """VQAv2 accuracy; each image is read once for all its questions, questions on unreadable images are counted."""
    from qformer.stage2 import generate_text

    device = next(model.parameters()).device
    transform = eval_transform(model.config.vision_config.image_size)
    by_image: dict[str, list[tuple[int, Question]]] = {}
    for order, question in enumerate(questions):
        by_image.setdefault(question.image, []).append((order, question))
    images, skipped, answered = list(by_image), SkippedImages(), []
    for start in progress(show_progress, "answers")(range(0, len(images), batch_size)):
        chunk = images[start : start + batch_size]
        pixels, kept = load_pixels(chunk, transform, skipped, max_image_pixels, image_root, allow_outside_root)
        pairs = [(row, item) for row, i in enumerate(kept) for item in by_image[chunk[i]]]  # (pixel row, (order, question))
        for part in (pairs[s : s + batch_size] for s in range(0, len(pairs), batch_size)):
            texts = generate_text(model, tokenizer, pixels[[row for row, _ in part]].to(device),
                                  [prompt.format(q.question) for _, (_, q) in part], **generation)
            answered += [(order, q, text) for (_, (order, q)), text in zip(part, texts)]
    if not answered:
        raise NoReadableImage(f"no readable image among the {len(images)} the questions ask about under {image_root}")
    predictions = [{"question_id": q.question_id, "answer": t, "accuracy": vqa_accuracy(t, q.answers)} for _, q, t in sorted(answered, key=lambda a: a[0])]
    accuracy = 100 * sum(p["accuracy"] for p in predictions) / len(predictions)
    return {"accuracy": accuracy, "questions": len(predictions), "skipped_questions": len(questions) - len(predictions),
            "skipped_images": len(skipped)}, predictions


# --- output ---------------------------------------------------------------------------------------------
def print_scores(title: str, scores: dict) -> None:
    print(title)
    width = max(len(k) for k in scores)
    for key, value in scores.items():
        print(f"  {key:<{width}}  {value:.2f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
