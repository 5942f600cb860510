"""`qformer eval retrieval | caption | vqa`: the paper's evaluations on any annotation file.

Each runs on one process, or sharded over several when started with `torchrun` (results are identical).
Entries whose image is missing or unreadable are reported by path, skipped and counted in the output.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from stages.data import Entry, clean_caption, eval_transform, load_annotations, load_rgb
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
    entries: list[Entry]
    image_root: Path
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, annotations: str, image_root: str) -> "EvalSet":
        """Entries with a readable image; the others are reported by path and counted."""
        root = Path(image_root)
        kept, skipped = [], []
        for entry in load_annotations(annotations):
            path = root / entry.image
            try:
                with Image.open(path) as image:
                    image.verify()
                kept.append(entry)
            except (OSError, SyntaxError, ValueError) as error:
                skipped.append(str(path))
                print(f"skipping {path}: {error}", file=sys.stderr)
        if not kept:
            raise ValueError(f"{annotations}: no readable image under {root}")
        return cls(kept, root, skipped)

    def image_chunks(self, image_size: int, batch_size: int) -> tuple[list[int], callable]:
        transform = eval_transform(image_size)
        starts = list(range(0, len(self.entries), batch_size))

        def load_chunk(c: int) -> torch.Tensor:
            chunk = self.entries[starts[c] : starts[c] + batch_size]
            return torch.stack([transform(load_rgb(self.image_root / e.image)) for e in chunk])

        return [len(self.entries[s : s + batch_size]) for s in starts], load_chunk


def progress(enabled: bool, desc: str):
    return lambda items: tqdm(items, desc=desc, disable=not enabled, file=sys.stderr)


# --- retrieval ----------------------------------------------------------------------------------------
def evaluate_retrieval(model, tokenizer, data: EvalSet, k_test: int = 128, itc_only: bool = False, batch_size: int = 64,
                       rank: int = 0, world: int = 1, show_progress: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Recall@1/5/10 both ways (+ the score matrices) of a stage-1 model on an evaluation set."""
    from qformer.retrieval import compute_features, itc_only_scores, itc_similarity, rerank

    texts, txt2img, img2txt = [], [], []
    for i, entry in enumerate(data.entries):
        img2txt.append(list(range(len(texts), len(texts) + len(entry.captions))))
        for caption in entry.captions:
            texts.append(clean_caption(caption))
            txt2img.append(i)
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=model.config.max_text_length, return_tensors="pt")
    sizes, load_chunk = data.image_chunks(model.config.vision_config.image_size, batch_size)
    model.eval()
    features = compute_features(model, load_chunk, sizes, tokens["input_ids"], tokens["attention_mask"], batch_size, rank, world,
                                reduce_sum, progress(show_progress and rank == 0, "image features"))
    sim = itc_similarity(features.image_feats, features.text_feat)
    if itc_only:
        score_i2t, score_t2i = itc_only_scores(sim)
    else:
        score_i2t, score_t2i = rerank(model, features, sim, k_test, batch_size, rank, world, reduce_sum,
                                      progress(show_progress and rank == 0, f"ITM re-rank (k={k_test})"))
    result = retrieval_recalls(score_i2t.cpu(), score_t2i.cpu(), img2txt, txt2img)
    result.update(images=len(data.entries), texts=len(texts), skipped_images=len(data.skipped))
    return result, score_i2t, score_t2i


# --- captioning ---------------------------------------------------------------------------------------
def generate_captions(model, tokenizer, data: EvalSet, prompt: str, batch_size: int, generation: dict, rank: int = 0,
                      world: int = 1, show_progress: bool = True) -> dict[str, str]:
    """{image id: caption} for every entry; with several processes each captions its share, then all are gathered."""
    from qformer.stage2 import generate_text

    device = next(model.parameters()).device
    transform = eval_transform(model.config.vision_config.image_size)
    mine = data.entries[rank::world]
    captions = {}
    for start in progress(show_progress and rank == 0, "captions")(range(0, len(mine), batch_size)):
        chunk = mine[start : start + batch_size]
        pixels = torch.stack([transform(load_rgb(data.image_root / e.image)) for e in chunk]).to(device)
        for entry, text in zip(chunk, generate_text(model, tokenizer, pixels, [prompt] * len(chunk), **generation)):
            captions[entry.image_id] = text
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, captions)
        captions = {k: v for part in parts for k, v in part.items()}
    return captions


def evaluate_captions(model, tokenizer, data: EvalSet, prompt: str, batch_size: int, generation: dict, rank: int = 0,
                      world: int = 1, show_progress: bool = True) -> tuple[dict, dict[str, str], list[str]]:
    captions = generate_captions(model, tokenizer, data, prompt, batch_size, generation, rank, world, show_progress)
    references = {e.image_id: [clean_caption(c) for c in e.captions] for e in data.entries}
    scores, notices = caption_metrics(captions, references)
    scores.update(images=len(captions), skipped_images=len(data.skipped))
    return scores, captions, notices


# --- VQA ------------------------------------------------------------------------------------------------
@dataclass
class Question:
    question_id: object
    image: str
    question: str
    answers: list[str]


def load_questions(path: str) -> list[Question]:
    """`[{"question_id", "image", "question", "answer": [10 human answers]}]` (LAVIS's VQAv2 eval format)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"question file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of questions like "
                         '[{"question_id": 1, "image": "x.jpg", "question": "...", "answer": ["...", ...]}]')
    questions = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not all(k in item for k in ("image", "question", "answer")):
            raise ValueError(f"{path}: entry {i} needs 'image', 'question' and 'answer' (a list of human answers)")
        answers = item["answer"] if isinstance(item["answer"], list) else [item["answer"]]
        questions.append(Question(item.get("question_id", i), item["image"], item["question"], [str(a) for a in answers]))
    return questions


def evaluate_vqa(model, tokenizer, questions: list[Question], image_root: Path, prompt: str, batch_size: int, generation: dict,
                 show_progress: bool = True) -> tuple[dict, list[dict]]:
    from qformer.stage2 import generate_text

    device = next(model.parameters()).device
    transform = eval_transform(model.config.vision_config.image_size)
    readable, skipped = [], []
    for q in questions:
        path = image_root / q.image
        try:
            readable.append((q, transform(load_rgb(path))))
        except (OSError, SyntaxError, ValueError) as error:
            skipped.append(str(path))
            print(f"skipping {path}: {error}", file=sys.stderr)
    predictions = []
    for start in progress(show_progress, "answers")(range(0, len(readable), batch_size)):
        chunk = readable[start : start + batch_size]
        pixels = torch.stack([p for _, p in chunk]).to(device)
        texts = generate_text(model, tokenizer, pixels, [prompt.format(q.question) for q, _ in chunk], **generation)
        predictions += [{"question_id": q.question_id, "answer": t, "accuracy": vqa_accuracy(t, q.answers)} for (q, _), t in zip(chunk, texts)]
    accuracy = 100 * sum(p["accuracy"] for p in predictions) / max(1, len(predictions))
    return {"accuracy": accuracy, "questions": len(predictions), "skipped_images": len(skipped)}, predictions


# --- output ---------------------------------------------------------------------------------------------
def print_scores(title: str, scores: dict) -> None:
    print(title)
    width = max(len(k) for k in scores)
    for key, value in scores.items():
        print(f"  {key:<{width}}  {value:.2f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
