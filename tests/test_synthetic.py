"""The built-in synthetic dataset: seeded, split sizes as asked, captions that identify the content."""

import json
import random

import pytest

from stages.cli import main
from stages.data.synthetic import (
    COLORS,
    SHAPES,
    _scene,
    captions_for,
    content_key,
    distinct_contents,
    make_dataset,
    questions_for,
)


def test_make_data_writes_the_asked_splits_reproducibly(tmp_path, capsys):
    argv = ["make-data", "--num-images", "40", "--val-images", "5", "--test-images", "7", "--seed", "3"]
    assert main([*argv[:1], str(tmp_path / "a"), *argv[1:]]) == 0
    assert main([*argv[:1], str(tmp_path / "b"), *argv[1:]]) == 0
    assert "train 28, val 5, test 7" in capsys.readouterr().out
    for name in ("train.json", "val.json", "test.json", "images/000000.png", "images/000039.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    test = json.loads((tmp_path / "a" / "test.json").read_text())
    assert len({content_key(e["objects"]) for e in test}) == len(test) == 7  # every test caption names one image
    questions = json.loads((tmp_path / "a" / "test_vqa.json").read_text())
    assert [q["image"] for q in questions] == [e["image"] for e in test]
    for q, e in zip(questions, test):
        assert (q["question"], q["answer"][0]) in questions_for(e["objects"]) and q["answer"] == q["answer"][:1] * 10
    train = json.loads((tmp_path / "a" / "train.json").read_text())
    assert len(train) == 28 * 5 and {e["caption"] for e in train} >= set(captions_for(train[0]["objects"]))


def test_every_caption_names_every_object():
    rng = random.Random(0)
    for _ in range(50):
        objects = _scene(rng)
        for caption in captions_for(objects):
            for o in objects:
                assert all(word in caption.split() for word in (o["size"], o["color"], o["shape"])), caption


def test_distinct_contents_counts_what_scenes_can_be():
    rng = random.Random(1)
    seen = {content_key(_scene(rng)) for _ in range(60_000)}
    assert len(seen) == distinct_contents() == 1260
    assert all(len(key) == 1 or key[0][1:] != key[1][1:] for key in seen)  # two objects never look the same
    assert {key[0][1] for key in seen} == set(COLORS) and {key[0][2] for key in seen} == set(SHAPES)


def test_impossible_splits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="leaves no training images"):
        make_dataset(tmp_path, num_images=10, val_images=5, test_images=5)
    with pytest.raises(ValueError, match="distinct content"):
        make_dataset(tmp_path, num_images=5000, test_images=2000)


def test_questions_have_exactly_one_right_answer():
    red_circle = {"size": "small", "color": "red", "shape": "circle"}
    blue_circle = {"size": "large", "color": "blue", "shape": "circle"}
    assert questions_for([red_circle]) == [("what color is the circle?", "red"), ("what shape is the red object?", "circle")]
    # Two circles: "what color is the circle?" has no single answer, so only shape questions are asked.
    assert questions_for([red_circle, blue_circle]) == [("what shape is the red object?", "circle"), ("what shape is the blue object?", "circle")]
    rng = random.Random(2)
    assert all(questions_for(_scene(rng)) for _ in range(1000))
