"""Instruction tasks on the synthetic scenes (`qformer make-data --instruct`, `qformer demo --instruct`).

Besides captions, four question tasks, each a VQA file per split (`{split}_{task}.json`, the format `qformer eval vqa`
reads and `data.train` mixes with task templates): the colour of an object, the shape of an object, how many objects
there are, and what is on the left or right. Two template files go with them: `templates.yaml` (the phrasings
training draws from, after InstructBLIP's) and `templates_heldout.yaml` (phrasings never seen in training, for the
evaluation). The scenes' vocabularies (`vocab.txt`, the LM tokenizers) then cover these words too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

# Training phrasings, a few of InstructBLIP's (configs/instruct/templates.yaml holds all of them).
TEMPLATES = {
    "caption": ["<Image>A short image caption:", "<Image>Briefly describe the content of the image.",
                "<Image>Write a short description for the image.", "<Image>A photo of"],
    "vqa": ["<Image>Question: {} Short answer:", "<Image>{} A short answer to the question is", "<Image>Q: {} A:",
            "<Image>Given the image, answer the following question with no more than three words. {}"],
}
# Held-out phrasings: no template here is in TEMPLATES, and most of their words occur in no training text.
HELDOUT_TEMPLATES = {
    "caption": ["<Image>Describe this picture in a few words:", "<Image>What does the image show? Answer briefly:",
                "<Image>Give the picture a one-line caption:"],
    "vqa": ["<Image>Look at the picture and answer: {} Answer:", "<Image>{} Reply in a word or two:",
            "<Image>Here is a question about the image: {} The answer is"],
}
QUESTION_TASKS = ("color", "shape", "count", "position")


def _name(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def task_questions(objects: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """Task -> the (question, answer) pairs with one right answer about a scene (objects left to right)."""
    tasks = {task: [] for task in QUESTION_TASKS}
    for o in objects:
        if sum(other["shape"] == o["shape"] for other in objects) == 1:
            tasks["color"].append((f"what color is the {o['shape']}?", o["color"]))
        if sum(other["color"] == o["color"] for other in objects) == 1:
            tasks["shape"].append((f"what shape is the {o['color']} object?", o["shape"]))
    tasks["count"].append(("how many objects are there?", ["one", "two"][len(objects) - 1]))
    if len(objects) == 2:  # left and right need two objects
        tasks["position"] += [("what is on the left?", _name(objects[0])), ("what is on the right?", _name(objects[1]))]
    return tasks


def task_entries(entries: list[dict], task: str) -> list[dict]:
    """Every question of `task` about the split's images, in the VQA format (all ten "annotators" agree)."""
    questions = []
    for entry in entries:
        for question, answer in task_questions(entry["objects"])[task]:
            questions.append({"question_id": len(questions), "image": entry["image"], "question": question,
                              "answer": [answer] * 10, "image_id": entry["image_id"]})
    return questions


def task_words(colors, shapes) -> str:
    """All the text the tasks and templates add to the vocabularies of scenes of these colours and shapes."""
    questions = {q + " " + a for o in _every_pair(colors, shapes) for pairs in task_questions(o).values() for q, a in pairs}
    templates = [t for file in (TEMPLATES, HELDOUT_TEMPLATES) for ts in file.values() for t in ts]
    return " ".join(sorted(questions) + templates).replace("<Image>", " ").replace("{}", " ")


def words_of(text: str) -> list[str]:
    """The words of `text` as the scenes' tokenizers split it (lower case, punctuation apart)."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _every_pair(colors, shapes) -> list[list[dict]]:
    kinds = [{"color": c, "shape": s, "size": "small"} for c in colors for s in shapes]
    return [[a] for a in kinds] + [[a, b] for a in kinds for b in kinds if a != b]


def write_instruction_tasks(folder: Path, splits: dict[str, list[dict]]) -> None:
    """`{split}_{task}.json` for every split and question task, and the two template files."""
    for split, entries in splits.items():
        for task in QUESTION_TASKS:
            (folder / f"{split}_{task}.json").write_text(json.dumps(task_entries(entries, task), indent=1))
    (folder / "templates.yaml").write_text("# training phrasings (qformer make-data --instruct)\n" + yaml.safe_dump(TEMPLATES, sort_keys=False))
    (folder / "templates_heldout.yaml").write_text("# held-out phrasings, never seen in training\n"
                                                   + yaml.safe_dump(HELDOUT_TEMPLATES, sort_keys=False))
