"""Instruction data (issue 29): the instruction format, caption and VQA files made instructions by task templates drawn
per sample (the same draw in a resumed run), and the shipped template files."""

import json
from pathlib import Path

import pytest
import torch

from qformer.transforms import eval_transform, train_transform
from stages.data.annotations import AnnotationError
from stages.data.captions import CaptionDataset, Collate
from stages.data.instructions import load_templates, read_samples, sample_text
from stages.data.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "configs" / "instruct" / "templates.yaml"
HELD_OUT = ROOT / "configs" / "instruct" / "templates_heldout.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instruct_data")
    make_dataset(folder, num_images=8, seed=1, val_images=2, test_images=2, image_size=32)
    entries = [{"image": "images/000000.png", "instruction": "<Image>What is on the left?", "output": ["a circle", "circle"]},
               {"image": "images/000001.png", "instruction": "How many objects are there?", "output": "two"}]
    (folder / "instructions.json").write_text(json.dumps(entries))
    return folder


def write(folder: Path, name: str, content) -> Path:
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_the_shipped_templates_load_and_the_held_out_ones_are_other_phrasings():
    seen, held_out = load_templates(TEMPLATES), load_templates(HELD_OUT)
    assert set(seen) == set(held_out) == {"caption", "vqa"}
    assert all(10 <= len(seen[task]) <= 15 for task in seen)  # InstructBLIP: 10-15 per task
    assert "A short image caption:" in seen["caption"] and "Question: {} Short answer:" in seen["vqa"]  # <Image> stripped
    assert not any("<Image>" in t for task in seen for t in seen[task])
    assert not set(seen["caption"]) & set(held_out["caption"]) and not set(seen["vqa"]) & set(held_out["vqa"])


def test_instruction_vqa_and_caption_files_become_samples_with_one_image_index_per_image(data):
    templates, index = load_templates(TEMPLATES), {}
    task, instructions = read_samples(data / "instructions.json", templates, index)
    assert task == "instruction"
    assert sample_text(instructions[0][1], drawn=False) == {"instruction": "What is on the left?", "caption": "a circle"}
    task, vqa = read_samples(data / "val_vqa.json", templates, index)
    question = json.loads((data / "val_vqa.json").read_text())[0]
    assert task == "vqa" and sample_text(vqa[0][1], drawn=False) == {"instruction": question["question"],
                                                                      "caption": question["answer"][0]}
    task, captions = read_samples(data / "train.json", templates, index)
    assert task == "caption" and sample_text(captions[0][1], drawn=False)["instruction"] == "A short image caption:"
    assert captions[0][2] == instructions[0][2] == 0  # images/000000.png: one index across the files
    task, plain = read_samples(data / "train.json", None, {})
    assert [s[1] for s in plain] == [sample_text(s[1], drawn=False)["caption"] for s in captions]  # no templates: captions


def test_templates_are_drawn_per_sample_and_a_resumed_run_draws_the_same(data):
    _, samples = read_samples(data / "val_vqa.json", load_templates(TEMPLATES), {})
    dataset = CaptionDataset(None, data, train_transform(32, True, (0.5, 1.0)), samples=samples)
    dataset.seed = 5

    def drawn(epoch: int, global_seed: int) -> str:
        torch.manual_seed(global_seed)  # the global RNG, as another run (or a resumed one) has it: must not matter
        return dataset[(epoch, 0)]["instruction"]

    first = [drawn(e, e) for e in range(20)]
    assert first == [drawn(e, 1000 + e) for e in range(20)]
    assert len(set(first)) >= 5  # several templates over the epochs, not always the first
    assert all(samples[0][1].question in i for i in first)


def test_an_instruction_sample_keeps_its_crop_and_the_batch_carries_its_instructions(data):
    templates = load_templates(TEMPLATES)
    _, plain = read_samples(data / "train.json", None, {})
    _, instructed = read_samples(data / "train.json", templates, {})
    transform = train_transform(32, True, (0.5, 1.0))
    before, after = (CaptionDataset(None, data, transform, samples=s) for s in (plain, instructed))
    before.seed = after.seed = 3
    old, new = before[(1, 2)], after[(1, 2)]
    assert torch.equal(old["pixel_values"], new["pixel_values"])  # the text is drawn after the crop and flip
    assert new["caption"] == old["caption"] and new["instruction"] in templates["caption"]
    assert "instruction" not in CaptionDataset(None, data, eval_transform(32), samples=plain)[0]

    calls = []
    collate = Collate(lambda captions, keys, **kwargs: calls.append(kwargs) or {})
    batch = collate([new, old])
    assert batch["instructions"] == [new["instruction"], None] and calls == [{"instructions": batch["instructions"]}]
    collate([old, old])
    assert calls[-1] == {}  # caption-only batches call the encoder as before


@pytest.mark.parametrize(("entries", "message"), [
    ([{"image": "a.png", "instruction": "Describe it."}], "entry 0: no 'output'"),
    ([{"image": "a.png", "instruction": "ok", "output": "x"}, {"image": "b.png", "instruction": "  ", "output": "y"}],
     "entry 1: the instruction is empty"),
    ([{"image": "a.png", "instruction": "<Image>", "output": "y"}], "entry 0: the instruction is empty"),
    ([{"image": "a.png", "instruction": "Look <Image> here", "output": "y"}], "entry 0: <Image> may only begin"),
    ([{"image": "a.png", "instruction": "Describe it.", "output": []}], "entry 0: 'output' must be a non-empty string"),
    ([{"image": "a.png", "instruction": "Describe it.", "output": ["ok", ""]}], "entry 0: 'output' must be"),
])
def test_bad_instruction_entries_are_named(tmp_path, entries, message):
    path = write(tmp_path, "bad.json", entries)
    with pytest.raises(AnnotationError) as error:
        read_samples(path, None, {})
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("content", "message"), [
    ("vqa:\n  - 'Question: {} Answer:'\n  - '<Image>What is it?'\n", "vqa[1]: 'What is it?' has 0 {}; a vqa template needs exactly one {}"),
    ("caption:\n  - 'A photo of {}'\n", "caption[0]: 'A photo of {}' has 1 {}; a caption template needs no {}"),
    ("vqa:\n  - '{} and {}'\n", "has 2 {}"),
    ("captions:\n  - 'A photo of'\n", "unknown task 'captions'; the tasks are caption, vqa"),
    ("caption: []\n", "caption must be a non-empty list"),
    ("caption:\n  - 'A photo <Image> of'\n", "caption[0]: <Image> may only begin"),
    ("[1, 2", "is not YAML or JSON"),
])
def test_bad_templates_are_named(tmp_path, content, message):
    path = write(tmp_path, "templates.yaml", content)
    with pytest.raises(AnnotationError) as error:
        load_templates(path)
    assert f"data.templates: {path}" in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_vqa_file_needs_templates_with_a_vqa_task(data, tmp_path):
    with pytest.raises(AnnotationError, match="val_vqa.json is a vqa file: give data.templates"):
        read_samples(data / "val_vqa.json", None, {})
    with pytest.raises(AnnotationError, match="data.templates has no vqa templates"):
        read_samples(data / "val_vqa.json", load_templates(write(tmp_path, "t.yaml", "caption: ['A photo of']")), {})
    blank = write(tmp_path, "blank.json", [{"image": "a.png", "question": " ", "answer": ["x"]}])
    with pytest.raises(AnnotationError, match="blank.json: entry 0: the question is empty"):
        read_samples(blank, load_templates(TEMPLATES), {})


def test_a_feature_cache_gives_instruction_samples_their_drawn_template(tmp_path):
    """Training from a feature cache (`data.features`) draws a sample's template as training from images does: the
    same for the same (epoch, index), the first one in validation."""
    from stages.data.feature_cache import CachedCaptionDataset
    from stages.data.instructions import InstructionText

    class Cache:  # the two calls the dataset makes of a FeatureCache
        views = [0]

        def unreadable(self, image):
            return None

        def tokens(self, image, view):
            return torch.zeros(2, 4)

    text = InstructionText(("red",), tuple(f"template {i}: {{}}" for i in range(10)), "what color is it?")
    dataset = CachedCaptionDataset([("a.png", text, 0)] * 8, Cache(), train=True)
    drawn = [dataset[(1, i)] for i in range(8)]
    assert all(d["caption"] == "red" and d["instruction"].endswith(": what color is it?") for d in drawn)
    assert len({d["instruction"] for d in drawn}) > 1 and dataset[(1, 3)]["instruction"] == drawn[3]["instruction"]
    assert dataset[3]["instruction"] == "template 0: what color is it?"
