"""Zero-shot VQAv2 evaluation, `qformer eval vqa`: LAVIS's question files, each image read once for all its questions."""

from __future__ import annotations

from qformer.generation import VQA_GENERATION, GenerationSettings, vqa_prompt
from qformer.workshare import WorkShare
from stages.apps.generate import generate_for_images
from stages.data.feature_cache import image_source
from stages.data.images import ImageReader
from stages.data.questions import Question, load_questions  # noqa: F401 (the eval's reader, re-exported)
from stages.distributed import gather_objects
from stages.eval.common import EvalOptions, NoReadableImage, print_scores, progress, setup_processes
from stages.eval.metrics import vqa_accuracy
from stages.outputs import check_output_files, write_json


def evaluate_vqa(model, tokenizer, questions: list[Question], reader: ImageReader, prompt: str, batch_size: int,
                 settings: GenerationSettings, share: WorkShare = WorkShare(), show_progress: bool = True) -> tuple[dict, list[dict]]:
    """VQAv2 accuracy; each image is read once for all its questions, questions on unreadable images are counted.

    With several processes each answers the questions of its share of the images; answers and skipped images are
    then gathered, so every process returns what one process would.
    """
    by_image: dict[str, list[Question]] = {}
    for question in questions:
        by_image.setdefault(question.image, []).append(question)
    images = list(by_image)[share.rank :: share.world]
    answers = generate_for_images(model, tokenizer, images, [[prompt.format(q.question) for q in by_image[i]] for i in images],
                                  reader, settings, batch_size, progress(show_progress and share.is_main, "answers"))
    mine = {q.question_id: text for image, texts in zip(images, answers) if texts is not None
            for q, text in zip(by_image[image], texts)}
    answered = {k: v for part in gather_objects(mine) for k, v in part.items()}
    skipped = {path for part in gather_objects(list(reader.skipped.reasons)) for path in part}
    reader.skipped.finish(len(skipped) if share.is_main else len(reader.skipped))
    if not answered:
        raise NoReadableImage(f"no readable image among the {len(by_image)} the questions ask about under {reader.root}")
    predictions = [{"question_id": q.question_id, "answer": answered[q.question_id],
                    "accuracy": vqa_accuracy(answered[q.question_id], q.answers)} for q in questions if q.question_id in answered]
    accuracy = 100 * sum(p["accuracy"] for p in predictions) / len(predictions)
    return {"accuracy": accuracy, "questions": len(predictions), "skipped_questions": len(questions) - len(predictions),
            "skipped_images": len(skipped)}, predictions


def eval_vqa(
    *,
    model: str,
    options: EvalOptions,
    prompt_template: str | None = None,
    generation: GenerationSettings = VQA_GENERATION,
    predictions: str | None = None,
) -> int:
    """Zero-shot VQAv2 accuracy of a stage-2 model (the official evaluator's answer normalisation).

    Args:
        model: a stage-2 export folder.
        options: the options every evaluation takes; --data is a question file
            ([{"question_id", "image", "question", "answer": [human answers]}]).
        prompt_template: default "Question: {} Short answer:" for an instruction-tuned LM (FlanT5, or one
            whose tokenizer has a chat template), "Question: {} Answer:" for others (OPT), as the papers.
        generation: beam search settings (LAVIS's VQA defaults: short answers).
        predictions: write the answers to this JSON file.
    """
    from qformer.folders import load_stage2

    check_output_files(json=options.json, predictions=predictions)
    options.check_batch_size()
    share, torch_device = setup_processes(options.device)
    stage2, tokenizer = load_stage2(model)
    questions = load_questions(options.data, options.allow_outside_root)
    reader = image_source(options.images, options.features, stage2.visual_encoder, [q.image for q in questions], options.data,
                          options.max_image_pixels, options.allow_outside_root)
    prompt = vqa_prompt(stage2, tokenizer, prompt_template)
    scores, answers = evaluate_vqa(stage2.to(torch_device), tokenizer, questions, reader, prompt, options.batch_size, generation,
                                   share, not options.no_progress)
    if share.is_main:
        write_json(predictions, answers)
        print_scores(f"zero-shot VQA on {options.data} (prompt {prompt!r})", scores)
        write_json(options.json, scores)
    return 0
