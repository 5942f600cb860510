"""`qformer index` and `qformer search`: the right image is found, updates add, drop and re-read, broken files are
listed, another model's index is refused, and the index appears whole or not at all."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from qformer.stage1 import Stage1Model
from qformer.vision import IMAGE_MEAN, IMAGE_STD
from stages.apps.image_index import MANIFEST, ImageIndex
from stages.cli import main
from stages.data.synthetic import COLORS, make_dataset

from broken_files import write_broken_images
from tiny_models import write_stage1, write_stage2

PALETTE = list(COLORS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search_data")
    make_dataset(folder, num_images=24, seed=2)  # for the tokenizers: every colour and shape word
    return folder


@pytest.fixture(scope="module")
def models(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("search_models")
    return {"stage1": write_stage1(data, root / "stage1"), "other": write_stage1(data, root / "other", seed=1),
            "stage2": write_stage2(data, root / "stage2")}


def draw(path: Path, color: str, shape: str = "circle") -> Path:
    """One object of a known colour on white: the picture a query naming that colour must find."""
    image = Image.new("RGB", (64, 64), "white")
    box = (12, 12, 52, 52)
    ImageDraw.Draw(image).ellipse(box, fill=COLORS[color]) if shape == "circle" else ImageDraw.Draw(image).rectangle(box, fill=COLORS[color])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


class ColourModel:
    """Features that know colours, in place of an untrained model's: an image's feature is the palette colour most
    of its pixels have, a text's the colour it names. With them the right image of every query is known, so the
    index and search around them (files, rows, updates, ranking) can be checked; they count the images read."""

    def __init__(self, tokenizer, width: int):
        self.tokenizer = tokenizer
        self.width = width
        self.images_read = 0

    def image_features(self, model, pixels):
        rgb = pixels * torch.tensor(IMAGE_STD)[:, None, None] + torch.tensor(IMAGE_MEAN)[:, None, None]  # (B, 3, H, W)
        palette = torch.tensor(list(COLORS.values())) / 255  # (C, 3)
        distance = ((rgb.permute(0, 2, 3, 1)[..., None, :] - palette) ** 2).sum(-1)  # (B, H, W, C)
        colour = (distance < 0.02).sum((1, 2)).argmax(1)  # (B,)
        self.images_read += len(pixels)
        feats = F.one_hot(colour, self.width).float()[:, None, :].expand(-1, model.qformer.num_query_tokens, -1)
        return model.encode_image(pixels), feats

    def text_feat(self, model, input_ids, attention_mask):
        words = [set(text.split()) for text in self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)]
        colour = torch.tensor([next(i for i, c in enumerate(PALETTE) if c in w) for w in words])
        return F.one_hot(colour, self.width).float()


@pytest.fixture
def colour_model(models, monkeypatch):
    from qformer.bert import load_tokenizer

    oracle = ColourModel(load_tokenizer(models["stage1"] / "tokenizer"), width=16)
    monkeypatch.setattr("qformer.retrieval.image_features", oracle.image_features)
    monkeypatch.setattr(Stage1Model, "text_feat", lambda model, ids, mask: oracle.text_feat(model, ids, mask))
    return oracle


def run(capsys, argv: list[str], code: int = 0) -> tuple[str, str]:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def top(capsys, index: Path, text: str, k: int = 3) -> list[str]:
    out, _ = run(capsys, ["search", "--index", index, text, "--k", k, "--json"])
    hits = json.loads(out)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    return [Path(h["path"]).name for h in hits]


# --- finding the right image ----------------------------------------------------------------------------------
def test_each_query_finds_its_image_and_broken_files_are_listed(models, colour_model, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i, colour in enumerate(PALETTE):
        draw(photos / ("nested" if i % 2 else "") / f"{colour}.png", colour, "circle" if i % 3 else "square")
    broken = write_broken_images(photos / "broken")
    os.mkfifo(photos / "broken" / "fifo.png")  # would block a reader that opened it
    (photos / "broken" / "loop.jpg").symlink_to("loop.jpg")
    broken.update(fifo=photos / "broken" / "fifo.png", loop=photos / "broken" / "loop.jpg")
    out, err = run(capsys, ["index", "--model", models["stage1"], photos, "--out", tmp_path / "index", "--no-progress"])
    assert f"{len(PALETTE)} images ({len(PALETTE)} read, 0 unchanged, 0 dropped), {len(broken)} unreadable" in out
    for path in broken.values():
        assert f"skipping {path}:" in err
    for colour in PALETTE:
        assert top(capsys, tmp_path / "index", f"a large {colour} circle")[0] == f"{colour}.png"
    manifest = json.loads((tmp_path / "index" / MANIFEST).read_text())
    assert sorted(Path(s["path"]).name for s in manifest["skipped"]) == sorted(p.name for p in broken.values())


def test_updating_adds_drops_and_reads_changed_files_again(models, colour_model, tmp_path, capsys):
    photos = tmp_path / "photos"
    for name, colour in (("a", "red"), ("b", "green"), ("c", "blue"), ("d", "yellow")):
        draw(photos / f"{name}.png", colour)
    index = ["index", "--model", models["stage1"], photos, "--out", tmp_path / "index", "--no-progress"]
    run(capsys, index)
    assert colour_model.images_read == 4 and top(capsys, tmp_path / "index", "red")[0] == "a.png"

    (photos / "b.png").unlink()
    draw(photos / "e.png", "purple")
    draw(photos / "a.png", "orange")  # the same name, another picture
    stat = (photos / "a.png").stat()
    os.utime(photos / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock must not hide the change
    out, _ = run(capsys, index)
    assert "4 images (2 read, 2 unchanged, 1 dropped), 0 unreadable" in out
    assert colour_model.images_read == 4 + 2  # only the new and the changed file were read
    assert top(capsys, tmp_path / "index", "orange")[0] == "a.png"
    assert top(capsys, tmp_path / "index", "purple")[0] == "e.png"
    assert top(capsys, tmp_path / "index", "blue")[0] == "c.png"  # a kept row still belongs to its file
    assert "b.png" not in top(capsys, tmp_path / "index", "green", k=10)

    out, _ = run(capsys, index)
    assert "4 images (0 read, 4 unchanged, 0 dropped)" in out and colour_model.images_read == 6


# --- refusals and mistakes ---------------------------------------------------------------------------------------
def test_another_models_index_is_refused(models, data, tmp_path, capsys):
    run(capsys, ["index", "--model", models["stage1"], data / "images", "--out", tmp_path / "index", "--no-progress"])
    before = (tmp_path / "index" / MANIFEST).read_bytes()
    _, err = run(capsys, ["index", "--model", models["other"], data / "images", "--out", tmp_path / "index"], code=2)
    assert err.startswith("qformer index: error: --out: the index") and "was built with another model" in err
    assert len(err.strip().splitlines()) == 1
    _, err = run(capsys, ["search", "--index", tmp_path / "index", "--model", models["other"], "a red circle"], code=2)
    assert err.startswith("qformer search: error: --model: the index") and "was built with another model" in err
    assert (tmp_path / "index" / MANIFEST).read_bytes() == before
    shutil.copytree(models["stage1"], tmp_path / "moved")
    manifest = json.loads(before)
    manifest["model"]["folder"] = str(tmp_path / "gone")
    (tmp_path / "index" / MANIFEST).write_text(json.dumps(manifest))
    _, err = run(capsys, ["search", "--index", tmp_path / "index", "a red circle"], code=2)
    assert f"the model the index was built with is no longer at {tmp_path / 'gone'}; give its new place with --model" in err
    run(capsys, ["search", "--index", tmp_path / "index", "--model", tmp_path / "moved", "a red circle"])  # the same weights


@pytest.mark.parametrize("argv, expected", [
    (["index", "--model", "{stage1}", "{tmp}/empty", "--out", "{tmp}/index"], "no image files under"),
    (["index", "--model", "{stage1}", "{tmp}/nowhere", "--out", "{tmp}/index"], "folder not found: {tmp}/nowhere"),
    (["index", "--model", "{stage2}", "{data}/images", "--out", "{tmp}/index"], "holds a stage-2 model, not stage 1"),
    (["index", "--model", "{stage1}", "{data}/images", "--out", "{data}"], "not a qformer index (no qformer_index.json)"),
    (["search", "--index", "{data}", "a red circle"], "is not a qformer index"),
    (["search", "--index", "{tmp}/nowhere", "a red circle"], "index folder not found"),
])
def test_mistakes_are_one_line(models, data, tmp_path, capsys, argv, expected):
    (tmp_path / "empty").mkdir()
    values = {"stage1": models["stage1"], "stage2": models["stage2"], "data": data, "tmp": tmp_path}
    _, err = run(capsys, [a.format(**values) for a in argv], code=2)
    assert len(err.strip().splitlines()) == 1 and expected.format(**values) in err, err


def test_an_interrupted_update_leaves_the_old_index(models, colour_model, tmp_path, capsys, monkeypatch):
    photos = tmp_path / "photos"
    draw(photos / "a.png", "red")
    argv = ["index", "--model", models["stage1"], photos, "--out", tmp_path / "index", "--no-progress"]
    run(capsys, argv)
    draw(photos / "b.png", "blue")

    def interrupted(folder, *args):
        (folder / "image_feats.npy").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("stages.apps.search.write_index", interrupted)
    run(capsys, argv, code=130)
    assert {p.name for p in tmp_path.iterdir()} == {"photos", "index"}  # no half-written folder left
    assert [Path(s.path).name for s in ImageIndex(tmp_path / "index").images] == ["a.png"]


# --- the re-rank and the contact sheet (the tiny model's own features) ---------------------------------------------
def test_rerank_json_and_contact_sheet(models, data, tmp_path, capsys):
    shutil.copytree(data / "images", tmp_path / "photos")
    run(capsys, ["index", "--model", models["stage1"], tmp_path / "photos", "--out", tmp_path / "index", "--no-progress"])
    itc_only = json.loads(run(capsys, ["search", "--index", tmp_path / "index", "a small red circle", "--k", 5, "--json"])[0])
    reranked = json.loads(run(capsys, ["search", "--index", tmp_path / "index", "a small red circle", "--k", 5, "--rerank", 3,
                                       "--json", "--grid", tmp_path / "grid.png"])[0])
    assert len(itc_only) == len(reranked) == 5
    assert {h["path"] for h in reranked[:3]} == {h["path"] for h in itc_only[:3]}  # the same top 3, in ITM order
    assert [h["path"] for h in reranked[3:]] == [h["path"] for h in itc_only[3:]]
    assert all(0 < h["itm_probability"] < 1 for h in reranked[:3]) and all(h["itm_probability"] is None for h in reranked[3:])
    assert Image.open(tmp_path / "grid.png").size == (5 * 160, 160 + 28)

    Path(reranked[0]["path"]).touch()  # changed since indexing: left out of the re-rank, with a note
    out, err = run(capsys, ["search", "--index", tmp_path / "index", "a small red circle", "--k", 3, "--rerank", 3])
    assert reranked[0]["path"] not in out and "changed or removed since it was indexed" in err


# --- the weights' hash is read from the export, not computed on every run (issue 26) ----------------------------
@pytest.fixture
def hash_calls(monkeypatch):
    """Counts every hashing of model weights, wherever it is imported from."""
    import qformer.files
    import stages.data.feature_cache

    calls = []
    original = qformer.files.weights_sha256

    def counted(module):
        calls.append(type(module).__name__)
        return original(module)

    monkeypatch.setattr(qformer.files, "weights_sha256", counted)
    monkeypatch.setattr(stages.data.feature_cache, "weights_sha256", counted)
    return calls


def test_search_and_index_read_the_weights_hash_from_the_export(models, colour_model, hash_calls, tmp_path, capsys):
    from qformer.folders import load_stage1, recorded_weights_sha256
    from qformer.files import weights_sha256

    draw(tmp_path / "photos" / "a.png", "red")
    run(capsys, ["index", "--model", models["stage1"], tmp_path / "photos", "--out", tmp_path / "index", "--no-progress"])
    assert top(capsys, tmp_path / "index", "red") == ["a.png"]
    assert hash_calls == []  # neither index nor search hashed the model
    recorded = recorded_weights_sha256(models["stage1"])
    assert recorded == weights_sha256(load_stage1(models["stage1"])[0])  # the hash the index holds is the as-loaded one
    assert json.loads((tmp_path / "index" / MANIFEST).read_text())["model"]["weights_sha256"] == recorded


def test_an_export_and_an_index_written_before_the_hash_was_recorded_still_work(models, colour_model, hash_calls, tmp_path, capsys):
    from qformer.folders import recorded_weights_sha256

    old = tmp_path / "old_export"
    shutil.copytree(models["stage1"], old)
    marker = json.loads((old / "qformer_export.json").read_text())
    (old / "qformer_export.json").write_text(json.dumps({k: v for k, v in marker.items() if not k.startswith("weights_")}))
    draw(tmp_path / "photos" / "a.png", "red")
    run(capsys, ["index", "--model", old, tmp_path / "photos", "--out", tmp_path / "index", "--no-progress"])
    assert hash_calls == ["Stage1Model"]  # no recorded hash: hashed, once
    manifest = json.loads((tmp_path / "index" / MANIFEST).read_text())
    del manifest["names_sha256"]  # an index written before the checksum of the names was recorded
    (tmp_path / "index" / MANIFEST).write_text(json.dumps(manifest))
    out, _ = run(capsys, ["search", "--index", tmp_path / "index", "--model", models["stage1"], "red"])  # the same weights
    assert "a.png" in out and hash_calls == ["Stage1Model"]

    stat = (old / "model.safetensors").stat()
    marker_copy = old.parent / "new_export"
    shutil.copytree(models["stage1"], marker_copy)
    os.utime(marker_copy / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert recorded_weights_sha256(marker_copy) is None  # a weights file changed since the export: hashed again


# --- a damaged index is named, with the command that rebuilds it (issue 27, item 5) -----------------------------
def _edit_manifest(change):
    def edit(index: Path) -> None:
        manifest = json.loads((index / MANIFEST).read_text())
        change(manifest)
        (index / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return edit


def _truncate(index: Path) -> None:
    data = (index / "image_feats.npy").read_bytes()
    (index / "image_feats.npy").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, file, expected", [
    (_edit_manifest(lambda m: m["images"].reverse()), MANIFEST, "not listed in the order of the rows"),
    (_edit_manifest(lambda m: m["images"].pop()), "image_feats.npy", "3 rows, but qformer_index.json lists 2 images"),
    (_edit_manifest(lambda m: m["images"].append(dict(m["images"][0], path="/x.png"))), "image_feats.npy", "3 rows, but"),
    (_edit_manifest(lambda m: m.pop("skipped")), MANIFEST, "not a complete index manifest"),
    (lambda index: (index / MANIFEST).write_text("{oops"), MANIFEST, "not valid JSON"),
    (_truncate, "image_feats.npy", "truncated"),
    (lambda index: (index / "image_feats.npy").write_bytes(b"not numpy" * 20), "image_feats.npy", "not a numpy .npy array"),
    (lambda index: (index / "image_feats.npy").unlink(), "image_feats.npy", "missing"),
], ids=["reordered", "fewer-names", "more-names", "no-skipped", "not-json", "truncated-npy", "foreign-npy", "no-npy"])
def test_a_damaged_index_is_one_line_naming_the_file_and_the_rebuild(models, colour_model, tmp_path, capsys, damage, file, expected):
    for name, colour in (("a", "red"), ("b", "green"), ("c", "blue")):
        draw(tmp_path / "photos" / f"{name}.png", colour)
    argv = ["index", "--model", models["stage1"], tmp_path / "photos", "--out", tmp_path / "index", "--no-progress"]
    run(capsys, argv)
    damage(tmp_path / "index")
    _, err = run(capsys, ["search", "--index", tmp_path / "index", "red"], code=2)
    assert len(err.strip().splitlines()) == 1 and f"{tmp_path / 'index' / file}: " in err and expected in err, err
    assert f"qformer index --model MODEL FOLDER... --out {tmp_path / 'index'} --rebuild" in err
    assert "pickle" not in err
    _, err = run(capsys, argv, code=2)  # an update cannot reuse it either ...
    assert "--rebuild" in err
    out, _ = run(capsys, [*argv, "--rebuild"])  # ... and --rebuild replaces it
    assert "3 images (3 read, 0 unchanged, 0 dropped)" in out and top(capsys, tmp_path / "index", "red")[0] == "a.png"


# --- queries and results at the edges (issue 27, items 4 and 11) -------------------------------------------------
@pytest.fixture
def odd_index(models, colour_model, tmp_path, capsys):
    """Three pictures, one with a newline in its name, indexed through the folder and through a symlink to it."""
    photos = tmp_path / "photos"
    for name, colour in (("new\nline", "red"), ("b", "green"), ("c", "blue")):
        draw(photos / f"{name}.png", colour)
    (tmp_path / "link").symlink_to(photos)
    out, _ = run(capsys, ["index", "--model", models["stage1"], photos, tmp_path / "link", "--out", tmp_path / "index",
                          "--no-progress"])
    assert "3 images (3 read, 0 unchanged, 0 dropped)" in out  # not 6: the symlinked folder is the same folder
    return tmp_path / "index"


@pytest.mark.parametrize("query, expected", [
    ("", "the query '' has no words to look for"),
    ("   ", "the query '   ' has no words to look for"),
    ("caf\udce9", "the query b'caf\\xe9' is not UTF-8"),  # the Latin-1 bytes b"caf\xe9" as Python hands argv over
])
def test_an_empty_or_undecodable_query_is_refused(odd_index, capsys, query, expected):
    _, err = run(capsys, ["search", "--index", odd_index, query], code=2)
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_one_line_per_result_and_a_short_rerank_says_why(odd_index, capsys):
    out, _ = run(capsys, ["search", "--index", odd_index, "red", "--k", 3])
    assert len(out.splitlines()) == 3 and out.splitlines()[0].endswith("new\\nline.png")  # escaped, on its line
    assert str(odd_index.parent / "photos") in out and "link" not in out
    Path(odd_index.parent / "photos" / "b.png").touch()
    out, err = run(capsys, ["search", "--index", odd_index, "red", "--k", 3, "--rerank", 3])
    assert len(out.splitlines()) == 2
    assert "showing 2 of 3: 1 of the top 3 changed or were removed since the index was built" in err
