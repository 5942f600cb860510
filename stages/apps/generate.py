"""Text from images with a stage-2 model: the one image-batching generation loop, and the `caption` and `ask` commands."""

from __future__ import annotations

import json as json_io
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from qformer.generation import (
    CAPTION_GENERATION,
    CAPTION_PROMPT,
    VQA_GENERATION,
    GenerationSettings,
    check_max_new_tokens,
    generate_text,
    vqa_prompt,
)
from qformer.transforms import eval_transform
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_SUFFIXES, ImageReader, image_files


def generate_for_images(
    model,
    tokenizer,
    images: Sequence[str | Path],
    prompts: Sequence[Sequence[str]],  # per image, the prompts to answer (one caption prompt, or its questions)
    reader: ImageReader,
    settings: GenerationSettings,
    batch_size: int = 8,
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> list[list[str] | None]:
    """Per image, the texts generated for its prompts, in order; None for an unreadable image (named by `reader`).

    Each image is decoded once, however many prompts it has; `batch_size` images are read and `batch_size`
    prompts generated at a time.
    """
    device = next(model.parameters()).device
    transform = eval_transform(model.config.vision_config.image_size)
    texts: list[list[str] | None] = [None] * len(images)
    for start in progress(range(0, len(images), batch_size)):
        pixels, kept = reader.load(images[start : start + batch_size], transform)
        jobs = [(row, start + i, prompt) for row, i in enumerate(kept) for prompt in prompts[start + i]]
        for part in (jobs[s : s + batch_size] for s in range(0, len(jobs), batch_size)):
            generated = generate_text(model, tokenizer, pixels[[row for row, _, _ in part]].to(device), [p for _, _, p in part], settings)
            for (_, image, _), text in zip(part, generated):
                texts[image] = (texts[image] or []) + [text]
    return texts


def load_stage2_on(model: str, device: str):
    """A stage-2 export folder's (model, LM tokenizer), the model on `device` (checked)."""
    from qformer.folders import load_stage2
    from stages.distributed import device_for

    stage2, tokenizer = load_stage2(model)
    return stage2.to(device_for(device, 0)), tokenizer


def caption(
    images: list[str],
    *,
    model: str,
    prompt: str = CAPTION_PROMPT,
    generation: GenerationSettings = CAPTION_GENERATION,
    batch_size: int = 8,
    device: str = "cpu",
    json: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> int:
    """Caption images with a stage-2 model: one caption per image, printed as `path<TAB>caption` or JSON.

    Exit status 1 when an image could not be read (it is named on stderr; the others still get captions).

    Args:
        images: image files or folders (searched recursively for .jpg .jpeg .png .bmp .gif .tif .tiff .webp).
        model: a stage-2 export folder.
        prompt: text the caption continues ("" for none).
        generation: beam search (or nucleus sampling with top_p) settings.
        batch_size: images per generation batch.
        device: cpu, cuda or cuda:N.
        json: print a JSON list of {"image", "caption"} instead of path<TAB>caption lines.
        max_image_pixels: skip images whose header declares more pixels, before decoding.
    """
    paths = image_files(images)
    if not paths:
        raise ValueError("no image files given (folders are searched for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    stage2, tokenizer = load_stage2_on(model, device)
    check_max_new_tokens(stage2, tokenizer, [prompt], generation.max_new_tokens)
    reader = ImageReader(max_image_pixels)
    texts = generate_for_images(stage2, tokenizer, paths, [[prompt]] * len(paths), reader, generation, batch_size)
    results = [{"image": str(path), "caption": t[0]} for path, t in zip(paths, texts) if t is not None]
    if json:
        print(json_io.dumps(results, indent=2))
    else:
        for result in results:
            print(f"{result['image']}\t{result['caption']}")
    reader.skipped.finish()
    if reader.skipped:
        print(f"{len(reader.skipped)} image(s) could not be read, {len(results)} captioned", file=sys.stderr)
    return 1 if reader.skipped else 0


def ask(
    image: str,
    question: str,
    *,
    model: str,
    prompt_template: str | None = None,
    generation: GenerationSettings = VQA_GENERATION,
    device: str = "cpu",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> int:
    """Answer a question about an image, zero-shot, with the paper's prompt for the LM's family; or follow any
    instruction, with an instruction-aware model (InstructBLIP), whose Q-Former reads it too.

    Args:
        image: the image file.
        question: the question, in words (an instruction-aware model: any instruction, given to it as it is).
        model: a stage-2 export folder.
        prompt_template: the question's template; default "{}" for an instruction-aware model (the question is the
            whole instruction), else "Question: {} Short answer:" for an instruction-tuned LM (FlanT5, or one whose
            tokenizer has a chat template) and "Question: {} Answer:" for others (OPT), as the papers.
        generation: beam search settings (LAVIS's VQA defaults: short answers).
        device: cpu, cuda or cuda:N.
        max_image_pixels: refuse an image whose header declares more pixels, before decoding.
    """
    stage2, tokenizer = load_stage2_on(model, device)
    if prompt_template is None and stage2.config.qformer_text_input:
        prompt_template = "{}"  # the instruction is the whole prompt, as InstructBLIP is used
    prompt = vqa_prompt(stage2, tokenizer, prompt_template).format(question)
    check_max_new_tokens(stage2, tokenizer, [prompt], generation.max_new_tokens, prompt_name="question")
    reader = ImageReader(max_image_pixels)
    [answer] = generate_for_images(stage2, tokenizer, [image], [[prompt]], reader, generation, batch_size=1)
    if answer is None:
        return 1
    print(answer[0])
    return 0
