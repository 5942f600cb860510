"""VQA question files (LAVIS's VQAv2 format), read strictly: `qformer eval vqa` scores them and instruction tuning
trains on them (`stages.data.instructions`)."""

from __future__ import annotations

import json as json_io
import posixpath
from dataclasses import dataclass

from stages.data.annotations import read_json
from stages.data.images import OUTSIDE_ROOT_HINT, escapes_root


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
    questions, seen = [], set()
    for i, item in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(item, dict) or not all(k in item for k in ("image", "question", "answer")):
            raise ValueError(f"{where} needs 'image', 'question' and 'answer' (a list of human answers)")
        if not isinstance(item["image"], str) or not item["image"] or not isinstance(item["question"], str):
            raise ValueError(f"{where}: 'image' and 'question' must be strings")
        image = posixpath.normpath(item["image"])
        if not allow_outside_root and escapes_root(image):
            raise ValueError(f"{where}: image path {item['image']!r} leads outside the image root ({OUTSIDE_ROOT_HINT})")
        answers = item["answer"] if isinstance(item["answer"], list) else [item["answer"]]
        if not answers or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers):
            raise ValueError(f"{where}: 'answer' must be a non-empty list of human answers")
        question_id = item.get("question_id", i)
        if isinstance(question_id, bool) or not isinstance(question_id, (str, int)):
            raise ValueError(f"{where}: 'question_id' must be a string or an integer, got {json_io.dumps(question_id)}")
        if question_id in seen:
            raise ValueError(f"{where}: question_id {question_id!r} appears twice")
        seen.add(question_id)
        questions.append(Question(question_id, image, item["question"], [str(a) for a in answers]))
    return questions
