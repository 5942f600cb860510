"""Bad input never costs a run, a result or a file: broken images, duplicated entries, NaN, hostile paths."""

import json
import posixpath
from pathlib import Path

import pytest
import torch

from qformer.bert import load_tokenizer
from qformer.config import preset
from qformer.folders import save_stage1
from qformer.stage1 import Stage1Model
from qformer.transforms import eval_transform
from stages.cli import main
from stages.data.annotations import AnnotationError, clean_caption, load_annotations
from stages.data.captions import CaptionDataset
from stages.data.images import UnreadableImage, read_rgb
from stages.data.synthetic import make_dataset
from stages.eval import caption as ev
from stages.eval.common import EvalSet
from stages.eval.metrics import retrieval_recalls
from stages.eval.retrieval import evaluate_retrieval
from stages.eval.vqa import load_questions

from broken_files import write_broken_images, write_png_bomb


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_input_data")
    make_dataset(folder, num_images=80, seed=5, val_images=20, test_images=20)
    return folder


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    model = Stage1Model(config).eval()
    return model, tokenizer, save_stage1(model, tokenizer, tmp_path_factory.mktemp("stage1_export"))


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def one_caption_per_entry(entries: list[dict]) -> list[dict]:
    return [{"image": e["image"], "caption": c, "image_id": e["image_id"]} for e in entries for c in e["caption"]]


# --- reading images ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, reason", [("truncated", "truncated"), ("empty", "empty file"), ("text", "cannot identify"),
                                          ("bomb", "over the limit")])
def test_every_broken_image_is_one_named_error(tmp_path, kind, reason):
    path = write_broken_images(tmp_path)[kind]
    with pytest.raises(UnreadableImage, match=reason) as error:
        read_rgb(path)
    assert error.value.path == str(path)


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    # 12000 x 12000 is below Pillow's own error limit; the pixel data is cut short, so only decoding would notice
    path = write_png_bomb(tmp_path / "big.png", side=12000, valid=False)
    with pytest.raises(UnreadableImage, match="144,000,000 pixels is over the limit of 50,000,000"):
        read_rgb(path)
    with pytest.raises(UnreadableImage, match="over the limit of 1,000"):
        read_rgb(write_png_bomb(tmp_path / "small.png", side=40), max_pixels=1000)
    assert read_rgb(tmp_path / "small.png", max_pixels=1600).size == (40, 40)


# --- annotation files ----------------------------------------------------------------------------------------
def test_entries_of_one_image_are_merged_with_their_captions_united(data, tmp_path):
    entries = json.loads((data / "test.json").read_text())
    grouped = load_annotations(data / "test.json")
    per_caption = load_annotations(write_json(tmp_path / "per_caption.json", one_caption_per_entry(entries)))
    duplicated = load_annotations(write_json(tmp_path / "twice.json", entries + entries))
    for variant in (per_caption, duplicated):
        assert [(e.image, e.captions, e.image_id) for e in variant] == [(e.image, e.captions, e.image_id) for e in grouped]
    assert len(grouped) == len(entries) and sum(len(e.captions) for e in grouped) == sum(len(e["caption"]) for e in entries)


@pytest.mark.parametrize("ids, message", [
    ([float("nan"), float("nan")], "'image_id' is nan"),
    ([float("inf"), 1], "'image_id' is inf"),
    ([7, 7], "image id '7' is used for two images"),
    ([True, 2], "must be a string or a number"),
])
def test_unusable_or_colliding_ids_are_refused(tmp_path, ids, message):
    items = [{"image": f"images/{n}.png", "caption": "a cat", "image_id": i} for n, i in enumerate(ids)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(items))  # json writes NaN / Infinity, as pandas and numpy users' files contain them
    with pytest.raises(AnnotationError, match=message):
        load_annotations(path)


def test_one_path_under_two_ids_and_coco_id_collisions_are_refused(tmp_path):
    with pytest.raises(AnnotationError, match="appears under two image ids"):
        load_annotations(write_json(tmp_path / "a.json", [{"image": "x.png", "caption": "a", "image_id": 1},
                                                          {"image": "x.png", "caption": "b", "image_id": 2}]))
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], "annotations": []}
    with pytest.raises(AnnotationError, match="id '1' is used for two files"):
        load_annotations(write_json(tmp_path / "coco.json", coco))


def test_training_samples_of_one_image_share_one_image_index(data, tmp_path):
    entries = json.loads((data / "test.json").read_text())[:6]
    dataset = CaptionDataset(load_annotations(write_json(tmp_path / "ann.json", one_caption_per_entry(entries))), data, eval_transform(32))
    assert len(dataset) > 6 and len({index for _, _, index in dataset.samples}) == 6


@pytest.mark.parametrize("content, message", [
    (b"[]", "no entries"),
    ('[{"image": "caf\xe9.png", "caption": "x"}]'.encode("latin-1"), "not UTF-8 text"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_annotation_file_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_bytes(content)
    with pytest.raises(AnnotationError, match=message) as error:
        load_annotations(path)
    assert str(path) in str(error.value)


# --- image paths that leave the image root --------------------------------------------------------------------
@pytest.mark.parametrize("image", ["../outside.png", "/etc/passwd", "images/../../x.png"])
def test_paths_out_of_the_image_root_are_refused_unless_allowed(tmp_path, image):
    path = write_json(tmp_path / "ann.json", [{"image": image, "caption": "a cat"}])
    with pytest.raises(AnnotationError, match="leads outside the image root.*--allow-outside-root"):
        load_annotations(path)
    assert load_annotations(path, allow_outside_root=True)[0].image == posixpath.normpath(image)


def test_a_symbolic_link_out_of_the_root_is_skipped_and_named(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret"
    root.mkdir(), outside.mkdir()
    write_png_bomb(outside / "x.png", side=16)
    (root / "link.png").symlink_to(outside / "x.png")
    entries = load_annotations(write_json(tmp_path / "ann.json", [{"image": "link.png", "caption": "a cat"}]))
    sample = CaptionDataset(entries, root, eval_transform(32))[0]
    assert sample["skipped"] == str(root / "link.png") and "outside the image root" in sample["reason"]
    assert "pixel_values" in CaptionDataset(entries, root, eval_transform(32), allow_outside_root=True)[0]


# --- retrieval: NaN is never a hit; images counted once --------------------------------------------------------
def test_nan_scores_are_never_hits():
    scores = torch.full((3, 3), float("nan"))
    result = retrieval_recalls(scores, scores.T, [[0], [1], [2]], [0, 1, 2])
    assert result["r_mean"] == 0.0
    mixed = torch.eye(3)  # every positive scores 1, every other entry 0 ...
    mixed[0, 1] = float("nan")  # ... but one negative is NaN: it ranks first, pessimistically
    result = retrieval_recalls(mixed, mixed.T, [[0], [1], [2]], [0, 1, 2])
    assert result["txt_r1"] == pytest.approx(200 / 3) and result["img_r1"] == pytest.approx(200 / 3)


def test_a_diverged_model_scores_zero_and_is_reported(stage1, data, tmp_path, capsys):
    model, tokenizer, _ = stage1
    diverged = Stage1Model(model.config).eval()
    diverged.load_state_dict(model.state_dict())
    with torch.no_grad():
        diverged.vision_proj.weight.fill_(float("nan"))
    result, _, _ = evaluate_retrieval(diverged, tokenizer, EvalSet.load(str(data / "test.json"), str(data)),
                                         itc_only=True, show_progress=False)
    assert result["r_mean"] == 0.0 and result["nonfinite_features"] == result["images"]
    assert "non-finite features" in capsys.readouterr().err


def test_retrieval_counts_each_image_once_and_skips_every_broken_file(stage1, data, tmp_path, capsys):
    model, tokenizer, _ = stage1
    entries = json.loads((data / "test.json").read_text())
    reference, _, _ = evaluate_retrieval(model, tokenizer, EvalSet.load(str(data / "test.json"), str(data)), k_test=4,
                                            batch_size=7, show_progress=False)
    broken = write_broken_images(data / "broken")
    noisy = one_caption_per_entry(entries + entries) + [
        {"image": f"broken/{p.name}", "caption": f"caption {i}", "image_id": f"broken{i}"} for i, p in enumerate(broken.values())]
    capsys.readouterr()
    result, score_i2t, _ = evaluate_retrieval(model, tokenizer, EvalSet.load(str(write_json(tmp_path / "noisy.json", noisy)), str(data)),
                                                 k_test=4, batch_size=7, show_progress=False)
    err = capsys.readouterr().err
    assert result == {**reference, "skipped_images": 4}
    assert result["images"] == len(entries) and score_i2t.shape[0] == len(entries)
    for path in broken.values():
        assert err.count(str(path)) == 1, err  # named once


def test_caption_references_are_the_union_of_all_entries(data, monkeypatch):
    entries = json.loads((data / "test.json").read_text())
    predictions = {str(e["image_id"]): e["caption"][0] for e in entries}
    scored = []
    monkeypatch.setattr(ev, "generate_captions", lambda *args, **kwargs: predictions)
    monkeypatch.setattr(ev, "caption_metrics", lambda p, r: scored.append((p, r)) or ({}, []))
    by_caption = EvalSet.load(str(write_json(data / "per_caption.json", one_caption_per_entry(entries))), str(data))
    scores, _, _ = ev.evaluate_captions(None, None, by_caption, "", 1, {})
    assert scores["images"] == len(entries)
    assert scored[0][1] == {str(e["image_id"]): [clean_caption(c) for c in e["caption"]] for e in entries}


# --- commands ---------------------------------------------------------------------------------------------------
def test_eval_commands_survive_broken_files_and_exit_clearly_when_nothing_is_readable(stage1, data, tmp_path, capsys):
    _, _, export = stage1
    broken = write_broken_images(tmp_path / "images")
    only_broken = write_json(tmp_path / "broken.json", [{"image": f"images/{p.name}", "caption": "x"} for p in broken.values()])
    capsys.readouterr()
    assert main(["eval", "retrieval", "--model", str(export), "--data", str(only_broken), "--images", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qformer eval retrieval: error: no readable image among the 4") and len(err) == 5  # 4 named + 1 error
    empty = write_json(tmp_path / "empty.json", [])
    assert main(["eval", "retrieval", "--model", str(export), "--data", str(empty), "--images", str(tmp_path)]) == 2
    assert "no entries" in capsys.readouterr().err


def test_caption_command_with_nothing_to_do_fails_clearly(stage1, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["caption", "--model", str(stage1[2]), str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == ("qformer caption: error: no image files given (folders are searched for "
                                               ".bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)")


def test_fit_annotation_mistake_is_one_line(data, tmp_path, capsys):
    bad = write_json(tmp_path / "bad.json", [{"image": "images/000001.png"}])
    argv = ["stage1", "fit", "--config", str(Path(__file__).parents[1] / "configs/stage1/tiny.yaml"), "--model.tokenizer", str(data),
            "--data.train", str(bad), "--data.val", "null", "--data.image_root", str(data), "--trainer.default_root_dir", str(tmp_path)]
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"qformer stage1: error: {bad}: entry 0: 'caption' must be a string or a non-empty list of strings"


def test_resuming_from_a_checkpoint_with_pickled_code_is_refused_in_one_line(data, tmp_path, capsys):
    import os

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": os.system}, evil)  # unpickling would import and hand over os.system
    argv = ["stage1", "fit", "--config", str(Path(__file__).parents[1] / "configs/stage1/tiny.yaml"), "--model.tokenizer", str(data),
            "--data.train", str(data / "train.json"), "--data.val", "null", "--data.image_root", str(data), "--data.batch_size", "8",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false", "--ckpt_path", str(evil)]
    capsys.readouterr()
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qformer stage1: error: --ckpt_path: refused to unpickle GLOBAL posix.system")
    assert "weights_only=False" not in last


# --- what a hostile-input trial found -----------------------------------------------------------------------------
def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path):
    import os
    import threading

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(UnreadableImage, read_rgb, fifo)), daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # opening the write end releases a reader blocked on the FIFO
        with open(fifo, "wb"):
            pass
    assert outcome and "FIFO" in outcome[0].value.reason


def test_a_symbolic_link_loop_is_skipped(tmp_path):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    entries = load_annotations(write_json(tmp_path / "ann.json", [{"image": "loop.png", "caption": "a cat"}]))
    sample = CaptionDataset(entries, tmp_path, eval_transform(32))[0]
    assert sample["skipped"] == str(tmp_path / "loop.png") and "symbolic links" in sample["reason"]


def test_one_image_spelt_two_ways_is_one_image(tmp_path):
    items = [{"image": "a/x.png", "caption": "one"}, {"image": "a/./x.png", "caption": "two"}, {"image": "a//x.png", "caption": "three"}]
    [entry] = load_annotations(write_json(tmp_path / "ann.json", items))
    assert (entry.image, entry.captions) == ("a/x.png", ["one", "two", "three"])
    with pytest.raises(AnnotationError, match="appears under two image ids"):
        load_annotations(write_json(tmp_path / "ids.json", [{**items[0], "image_id": 1}, {**items[1], "image_id": 2}]))


def test_a_diverged_model_scores_zero_with_the_itm_rerank_too(stage1, data):
    model, tokenizer, _ = stage1
    diverged = Stage1Model(model.config).eval()
    diverged.load_state_dict(model.state_dict())
    with torch.no_grad():
        diverged.vision_proj.weight.fill_(float("nan"))
    # 8 images, k_test 4: the positives outside the top 4 keep a finite -100, rank at most 8th, and would count at R@10
    few = write_json(data / "eight.json", json.loads((data / "test.json").read_text())[:8])
    result, _, _ = evaluate_retrieval(diverged, tokenizer, EvalSet.load(str(few), str(data)), k_test=4, show_progress=False)
    assert result["txt_r10"] == result["img_r10"] == 0.0


@pytest.mark.parametrize("question, message", [
    ({"answer": []}, "'answer' must be a non-empty list"),
    ({"question_id": float("nan")}, "'question_id' must be a string or an integer, got NaN"),
    ({"question_id": 0}, "question_id 0 appears twice"),
])
def test_vqa_questions_that_would_crash_or_mislead_are_refused(tmp_path, question, message):
    items = [{"question_id": 0, "image": "x.png", "question": "what?", "answer": ["a"]}, {"image": "y.png", "question": "why?",
                                                                                       "answer": ["b"], **question}]
    with pytest.raises(ValueError, match=message):
        load_questions(str(write_json(tmp_path / "q.json", items)))


def test_a_prompt_longer_than_the_lms_positions_keeps_its_end(data):
    from qformer.config import LanguageModelConfig
    from qformer.generation import GenerationSettings, generate_text
    from qformer.language_model import load_lm_tokenizer
    from qformer.stage2 import Stage2Model

    config = preset("tiny")
    config.language_model = LanguageModelConfig(config=dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                                            num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=48),
                                                tokenizer=str(data / "lm_tokenizer_decoder"), precision="fp32", eos_text="</s>")
    model, tokenizer = Stage2Model(config).eval(), load_lm_tokenizer(config.language_model)
    long_question = "what color is " + "the red circle " * 100 + "?"
    texts = generate_text(model, tokenizer, torch.randn(1, 3, 32, 32), [long_question], GenerationSettings(num_beams=1, max_new_tokens=4))
    assert len(texts) == 1


@pytest.mark.parametrize("argv, message", [
    (["caption", "--model", "{stage2}", "{image}", "--num-beams", "0"], "num_beams must be at least 1, got 0"),
    (["caption", "--model", "{stage2}", "{image}", "--max-new-tokens", "4"], "need 0 <= min_new_tokens <= max_new_tokens"),
    (["caption", "--model", "{stage2}", "{image}", "--max-image-pixels", "0"], "--max-image-pixels must be a positive number"),
    (["eval", "retrieval", "--model", "{stage1}", "--data", "{ann}", "--images", "{root}", "--k-test", "0"], "--k-test and --batch-size must be at least 1"),
    (["eval", "retrieval", "--model", "{stage1}", "--data", "{ann}", "--images", "{root}", "--json", "{root}"], "is a folder"),
])
def test_bad_option_values_are_one_line(stage1, data, tmp_path, capsys, argv, message):
    from qformer.config import LanguageModelConfig
    from qformer.folders import save_stage2
    from qformer.language_model import load_lm_tokenizer
    from qformer.stage2 import Stage2Model

    config = preset("tiny")
    config.qformer_config.vocab_size = stage1[0].config.qformer_config.vocab_size
    config.language_model = LanguageModelConfig(config=dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                                            num_attention_heads=2, word_embed_proj_dim=32), tokenizer=str(data / "lm_tokenizer_decoder"))
    stage2 = save_stage2(Stage2Model(config), load_lm_tokenizer(config.language_model), tmp_path / "stage2")
    values = {"stage1": str(stage1[2]), "stage2": str(stage2), "image": str(data / "images" / "000001.png"),
              "ann": str(data / "test.json"), "root": str(data)}
    capsys.readouterr()
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_folder_search_names_links_and_fifos_it_cannot_read(tmp_path):
    import os

    from stages.data.images import image_files

    (tmp_path / "broken.png").symlink_to(tmp_path / "missing.png")
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "folder.jpg").mkdir()
    assert sorted(p.name for p in image_files([tmp_path])) == ["broken.png", "fifo.jpg"]  # both then named as unreadable
    with pytest.raises(UnreadableImage, match="symbolic link to a missing file"):
        read_rgb(tmp_path / "broken.png")
