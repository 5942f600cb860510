"""Instruction data (InstructBLIP): the generic instruction format, and caption and VQA files made instruction data by
task templates drawn per sample.

Three file formats, told apart by their first entry:
* instruction: `[{"image": "x.jpg", "instruction": "What is on the left?", "output": "a red circle" or [...]}]`;
  several outputs are alternatives: each epoch a sample trains on one of them, drawn per sample.
* VQA (LAVIS's VQAv2 format, `stages.data.questions`): `[{"image", "question", "answer": [...]}]`; the instruction is a
  `vqa` template with its `{}` filled by the question, the output one of the answers, both drawn per sample.
* caption (`stages.data.annotations`): one sample per caption, as without templates; with templates, the instruction
  is a `caption` template drawn per sample.

Templates (`data.templates`, YAML or JSON: `{"caption": [...], "vqa": [...]}`) are drawn with the sample's seeded RNG
(`stages.data.sampling.sample_rng`, after the image's crop and flip): a resumed run draws what the first one did.
`<Image>` marks where the image goes, as in InstructBLIP's templates; the image's query tokens always come first in
the language model's input, so the marker may only begin an instruction and is stripped from it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.data.annotations import AnnotationError, clean_caption, load_annotations, read_json
from stages.data.images import OUTSIDE_ROOT_HINT, escapes_root
from stages.data.questions import load_questions

IMAGE_MARKER = "<Image>"
TASKS = {"caption": 0, "vqa": 1}  # a task's templates and how many `{}` (the question's place) each must have


# --- templates -------------------------------------------------------------------------------------------------
def strip_image_marker(text: str, where: str) -> str:
    """`text` without a leading `<Image>` (any case); a marker anywhere else is refused, as is an empty remainder."""
    text = text.strip()
    if text.lower().startswith(IMAGE_MARKER.lower()):
        text = text[len(IMAGE_MARKER):].strip()
    if IMAGE_MARKER.lower() in text.lower():
        raise AnnotationError(f"{where}: {IMAGE_MARKER} may only begin an instruction (the image's query tokens come first "
                              f"in the language model's input); move it to the start or remove it")
    if not text:
        raise AnnotationError(f"{where}: the instruction is empty; write what the model is asked to do")
    return text


def load_templates(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Task -> its templates (the `<Image>` marker stripped), each checked: a `vqa` one needs exactly one `{}`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.templates: template file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise AnnotationError(f"data.templates: {path} is not YAML or JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise AnnotationError(f"data.templates: {path}: expected a mapping of task to templates, e.g. caption: [...], vqa: [...]")
    templates = {}
    for task, items in data.items():
        if task not in TASKS:
            raise AnnotationError(f"data.templates: {path}: unknown task {task!r}; the tasks are {', '.join(TASKS)}")
        if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
            raise AnnotationError(f"data.templates: {path}: {task} must be a non-empty list of template strings")
        templates[task] = tuple(_checked_template(t, task, f"data.templates: {path}: {task}[{i}]") for i, t in enumerate(items))
    return templates


def _checked_template(template: str, task: str, where: str) -> str:
    template = strip_image_marker(template, where)
    holes = template.count("{}")
    if holes != TASKS[task]:
        need = "exactly one {} where the question goes" if TASKS[task] else "no {} (a caption has no question to fill in)"
        raise AnnotationError(f"{where}: {template!r} has {holes} {{}}; a {task} template needs {need}")
    return template


# --- the text of a sample ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstructionText:
    """What a sample's instruction and output are drawn from: fixed or template instructions, one or several outputs."""

    outputs: tuple[str, ...]
    templates: tuple[str, ...]  # one (the instruction) for the instruction format; a task's templates otherwise
    question: str | None = None  # fills a vqa template's {} (None: the instruction is used as written)

    def draw(self) -> dict:
        """Instruction and output drawn with torch's RNG (inside the sample's `sample_rng`)."""
        return self._fields(_pick(len(self.templates)), _pick(len(self.outputs)))

    def first(self) -> dict:
        """The first template and output: validation's fixed text."""
        return self._fields(0, 0)

    def _fields(self, template: int, output: int) -> dict:
        instruction = self.templates[template]
        if self.question is not None:
            instruction = instruction.replace("{}", self.question)
        return {"instruction": instruction, "caption": self.outputs[output]}


def _pick(count: int) -> int:
    return 0 if count == 1 else int(torch.randint(count, ()))


def sample_text(text: str | InstructionText, drawn: bool) -> dict:
    """A sample's text fields: {"caption"} for a plain caption, {"instruction", "caption"} for instruction text (drawn
    with the current RNG when `drawn`, else the first template and output)."""
    if isinstance(text, str):
        return {"caption": text}
    return text.draw() if drawn else text.first()


# --- files ---------------------------------------------------------------------------------------------------------
def file_task(path: str | Path) -> str:
    """instruction, vqa or caption: the format of an annotation file, from its first entry."""
    data = read_json(path)
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    if "instruction" in first:
        return "instruction"
    return "vqa" if "question" in first else "caption"


def read_samples(path: str | Path, templates: dict | None, image_index: dict[str, int], max_words: int = 50,
                 allow_outside_root: bool = False) -> tuple[str, list[tuple[str, str | InstructionText, int]]]:
    """The file's task and the (image path, text, image index) of every sample, for a file of any of the three formats.
    `image_index` maps image paths to indices and grows: files of one mixture that show an image give it one index."""
    task = file_task(path)
    return task, _task_samples(task, path, templates, image_index, max_words, allow_outside_root)


def _task_samples(task: str, path, templates: dict | None, image_index: dict[str, int], max_words: int,
                  allow_outside_root: bool) -> list[tuple[str, str | InstructionText, int]]:
    if task == "instruction":
        return [(image, text, image_index.setdefault(image, len(image_index)))
                for image, text in _instruction_entries(Path(path), allow_outside_root)]
    if task == "vqa":
        vqa = _task_templates(templates, "vqa", path)
        return [(q.image, _question_text(q, vqa, f"{path}: entry {i}"), image_index.setdefault(q.image, len(image_index)))
                for i, q in enumerate(load_questions(str(path), allow_outside_root))]
    caption = None if templates is None else _task_templates(templates, "caption", path)
    samples = []
    for entry in load_annotations(path, allow_outside_root):
        index = image_index.setdefault(entry.image, len(image_index))
        for text in (clean_caption(c, max_words) for c in entry.captions):
            samples.append((entry.image, text if caption is None else InstructionText((text,), caption), index))
    return samples


def _question_text(question, templates: tuple[str, ...], where: str) -> InstructionText:
    answers = tuple(a.strip() for a in question.answers if a.strip())
    if not question.question.strip():
        raise AnnotationError(f"{where}: the question is empty; write the question the answer answers")
    if not answers:
        raise AnnotationError(f"{where}: every answer is empty; give at least one answer to learn")
    return InstructionText(answers, templates, question.question.strip())


def _task_templates(templates: dict | None, task: str, path) -> tuple[str, ...]:
    if templates is None:
        raise AnnotationError(f"{path} is a {task} file: give data.templates, a file of task templates "
                              f"(e.g. configs/instruct/templates.yaml), to make its entries instructions")
    if task not in templates:
        raise AnnotationError(f"data.templates has no {task} templates, which {path} (a {task} file) needs; add a '{task}' list")
    return templates[task]


def _instruction_entries(path: Path, allow_outside_root: bool) -> list[tuple[str, InstructionText]]:
    data = read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a list of entries like "
                              '[{"image": "x.jpg", "instruction": "...", "output": "..." or ["...", ...]}]')
    return [_instruction_entry(path, i, item, allow_outside_root) for i, item in enumerate(data)]


def _instruction_entry(path: Path, index: int, item, allow_outside_root: bool) -> tuple[str, InstructionText]:
    where = f"{path}: entry {index}"
    if not isinstance(item, dict):
        raise AnnotationError(f"{where}: expected an object with 'image', 'instruction' and 'output', got {type(item).__name__}")
    if not isinstance(item.get("image"), str) or not item["image"]:
        raise AnnotationError(f"{where}: 'image' must be a path string")
    if not isinstance(item.get("instruction"), str):
        raise AnnotationError(f"{where}: 'instruction' must be a string (what the model is asked)")
    if "output" not in item:
        raise AnnotationError(f"{where}: no 'output'; give the answer the model should learn (a string or a list of them)")
    outputs = [item["output"]] if isinstance(item["output"], str) else item["output"]
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o.strip() for o in outputs):
        raise AnnotationError(f"{where}: 'output' must be a non-empty string or a non-empty list of them")
    image = posixpath.normpath(item["image"])
    if not allow_outside_root and escapes_root(image):
        raise AnnotationError(f"{where}: image path {item['image']!r} leads outside the image root ({OUTSIDE_ROOT_HINT})")
    instruction = strip_image_marker(item["instruction"], where)
    return image, InstructionText(tuple(o.strip() for o in outputs), (instruction,))
