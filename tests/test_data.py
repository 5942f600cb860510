"""The data module: annotation formats, caption cleaning, and images that are odd or broken."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qformer.transforms import eval_transform
from stages.data.annotations import AnnotationError, clean_caption, load_annotations
from stages.data.captions import CaptionDataset, Collate
from stages.data.synthetic import make_dataset
from stages.data.text import BertText


@pytest.fixture
def tokenizer(tmp_path_factory):
    from qformer.bert import load_tokenizer

    folder = tmp_path_factory.mktemp("vocab")
    make_dataset(folder, num_images=4, seed=0)
    return load_tokenizer(folder)


@pytest.fixture
def odd_images(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "rgb.jpg")
    Image.new("L", (40, 30), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (40, 30), (0, 255, 0, 0)).save(tmp_path / "rgba.png")  # fully transparent -> white
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit
    good = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    names = ["rgb.jpg", "gray.png", "rgba.png", "cmyk.jpg", "deep.png", "corrupt.jpg", "garbage.png", "missing.jpg"]
    entries = [{"image": n, "caption": f"Picture {i}!", "image_id": i} for i, n in enumerate(names)]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    return tmp_path


def test_clean_caption_like_lavis():
    assert clean_caption('A Dog (brown) jumps: "high"!  ') == "a dog brown jumps high"
    assert clean_caption("one two three four", max_words=2) == "one two"


def test_convertible_images_are_used_and_broken_ones_counted(odd_images, tokenizer):
    dataset = CaptionDataset(load_annotations(odd_images / "ann.json"), odd_images, eval_transform(16))
    samples = [dataset[i] for i in range(len(dataset))]
    used = [s for s in samples if "skipped" not in s]
    skipped = sorted(s["skipped"] for s in samples if "skipped" in s)
    assert len(used) == 5
    assert skipped == sorted(str(odd_images / n) for n in ("corrupt.jpg", "garbage.png", "missing.jpg"))
    white = eval_transform(16)(Image.new("RGB", (16, 16), (255, 255, 255)))
    torch.testing.assert_close(used[2]["pixel_values"], white)  # RGBA on white
    torch.testing.assert_close(used[4]["pixel_values"], white, atol=0.02, rtol=0)  # 16-bit full scale

    batch = Collate(BertText(tokenizer, 32))(samples)
    assert len(batch["skipped"]) == 3
    assert batch["pixel_values"].shape == (8, 3, 16, 16)  # refilled to the batch size
    assert batch["image_ids"].tolist()[:5] == [0, 1, 2, 3, 4]
    assert set(batch["image_ids"].tolist()[5:]) <= {0, 1, 2, 3, 4}  # refills are positives of their copies


def test_strict_mode_fails_with_the_path(odd_images):
    dataset = CaptionDataset(load_annotations(odd_images / "ann.json"), odd_images, eval_transform(16), strict=True)
    with pytest.raises(OSError, match="corrupt.jpg"):
        dataset[5]


def test_malformed_annotations_name_file_and_entry(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": "ok"}, {"image": "b.jpg"}]))
    with pytest.raises(AnnotationError, match=r"ann\.json: entry 1: 'caption'"):
        load_annotations(path)
    path.write_text("[{")
    with pytest.raises(AnnotationError, match=r"ann\.json: not valid JSON"):
        load_annotations(path)
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(AnnotationError, match=r"annotations\[0\]"):
        load_annotations(path)


def test_coco_and_lavis_formats(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}, {"image_id": 2, "caption": "z"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    entries = load_annotations(tmp_path / "coco.json")
    assert [(e.image, e.captions) for e in entries] == [("a.jpg", ["x", "y"]), ("b.jpg", ["z"])]
    lavis = [{"image": "a.jpg", "caption": ["x", "y"], "image_id": 7}, {"image": "a.jpg", "caption": "w", "image_id": 7}]
    (tmp_path / "lavis.json").write_text(json.dumps(lavis))
    dataset = CaptionDataset(load_annotations(tmp_path / "lavis.json"), tmp_path, eval_transform(16))
    assert [s[2] for s in dataset.samples] == [0, 0, 0]  # one image, three captions


def test_a_samples_rng_seeds_the_cpu_generator_alone_and_restores_it(monkeypatch):
    """Seeding CUDA, XPU or MTIA per sample (as torch.manual_seed does) is not restored by the fork and, before CUDA
    starts, formats a stack trace per call: about half of a 48-px demo batch's loading CPU time."""
    from stages.data.sampling import sample_rng

    def refused(*args, **kwargs):
        raise AssertionError("a per-sample seed reached an accelerator's generator")

    for device in ("cuda", "xpu", "mtia"):
        monkeypatch.setattr(getattr(torch, device), "manual_seed_all", refused)
    outside = torch.get_rng_state()
    with sample_rng(3, 1, 7):
        first = torch.rand(4)
    with sample_rng(3, 1, 7):
        again = torch.rand(4)
    assert torch.equal(first, again) and torch.equal(torch.get_rng_state(), outside)
