"""`qformer eval caption`: captioning scores of a stage-2 model (BLEU, CIDEr, ROUGE-L, METEOR with Java)."""

from __future__ import annotations

import sys

from qformer.generation import CAPTION_GENERATION, CAPTION_PROMPT, GenerationSettings
from qformer.workshare import WorkShare
from stages.apps.generate import generate_for_images
from stages.data.annotations import clean_caption
from stages.distributed import gather_objects
from stages.eval.common import EvalOptions, EvalSet, print_scores, progress, setup_processes
from stages.eval.metrics import caption_metrics
from stages.outputs import check_output_files, write_json


# --- captioning ---------------------------------------------------------------------------------------
def generate_captions(model, tokenizer, data: EvalSet, prompt: str, batch_size: int, settings: GenerationSettings,
                      share: WorkShare = WorkShare(), show_progress: bool = True) -> dict[str, str]:
    """{image id: caption} for every readable image; with several processes each captions its share, then all are gathered."""
    mine = data.entries[share.rank :: share.world]
    texts = generate_for_images(model, tokenizer, [e.image for e in mine], [[prompt]] * len(mine), data.reader, settings,
                                batch_size, progress(show_progress and share.is_main, "captions"))
    captions = {entry.image_id: text[0] for entry, text in zip(mine, texts) if text is not None}
    return {k: v for part in gather_objects(captions) for k, v in part.items()}


def evaluate_captions(model, tokenizer, data: EvalSet, prompt: str, batch_size: int, settings: GenerationSettings,
                      share: WorkShare = WorkShare(), show_progress: bool = True) -> tuple[dict, dict[str, str], list[str]]:
    """Caption scores against every reference caption of each readable image."""
    captions = generate_captions(model, tokenizer, data, prompt, batch_size, settings, share, show_progress)
    skipped = data.unreadable(share)
    if not captions:
        raise data.nothing_readable()
    references = {e.image_id: [clean_caption(c) for c in e.captions] for e in data.entries if e.image_id in captions}
    scores, notices = caption_metrics(captions, references)
    scores.update(images=len(captions), skipped_images=skipped)
    return scores, captions, notices


def eval_caption(
    *,
    model: str,
    options: EvalOptions,
    prompt: str = CAPTION_PROMPT,
    generation: GenerationSettings = CAPTION_GENERATION,
    predictions: str | None = None,
) -> int:
    """Captioning scores of a stage-2 model: BLEU-1..4, CIDEr, ROUGE-L (+ METEOR when Java runs).

    Args:
        model: a stage-2 export folder.
        options: the options every evaluation takes; --data's captions are the references.
        prompt: text every caption continues.
        generation: beam search settings (COCO evaluation: beam 5, 8 to 30 tokens).
        predictions: write the generated captions to this JSON file ([{"image_id", "caption"}]).
    """
    from qformer.folders import load_stage2

    check_output_files(json=options.json, predictions=predictions)
    options.check_batch_size()
    share, torch_device = setup_processes(options.device)
    stage2, tokenizer = load_stage2(model)
    evalset = options.load_set(stage2.visual_encoder)
    scores, captions, notices = evaluate_captions(stage2.to(torch_device), tokenizer, evalset, prompt, options.batch_size, generation,
                                                  share, not options.no_progress)
    if share.is_main:
        for notice in notices:
            print(f"note: {notice}", file=sys.stderr)
        source_ids = {e.image_id: e.image_id if e.source_id is None else e.source_id for e in evalset.entries}
        write_json(predictions, [{"image_id": source_ids[k], "caption": v} for k, v in captions.items()])  # ids as in the file
        print_scores(f"captioning on {options.data}", scores)
        write_json(options.json, scores)
    return 0
