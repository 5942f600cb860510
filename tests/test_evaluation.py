"""Retrieval scores and recalls, caption metrics, VQA accuracy, sharded evaluation and bad input."""

import json
import os
from pathlib import Path

import processes
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate

from qformer.bert import load_tokenizer
from qformer.config import preset
from qformer.folders import save_stage1
from qformer.retrieval import NOT_RANKED, RetrievalFeatures, compute_image_features, compute_text_features, itc_similarity, rerank
from qformer.stage1 import Stage1Model
from qformer.transforms import eval_transform
from qformer.workshare import WorkShare
from stages.cli import main
from stages.data.annotations import clean_caption
from stages.data.images import read_rgb
from stages.data.synthetic import make_dataset
from stages.distributed import reduce_sum
from stages.eval.common import EvalSet
from stages.eval.metrics import caption_metrics, normalize_answer, retrieval_recalls, simple_tokenize, vqa_accuracy
from stages.eval.retrieval import evaluate_retrieval
from stages.eval.vqa import load_questions

# --- recall on a hand-built matrix -------------------------------------------------------------------
# 3 images, 6 captions: image 0 has captions 0, 1; image 1 has 2, 3; image 2 has 4, 5.
SCORES = torch.tensor(
    [
        [0.1, 0.9, 0.8, 0.2, 0.35, 0.4],  # image 0: own caption 1 ranks first -> i2t rank 0
        [0.95, 0.5, 0.15, 0.25, 0.3, 0.6],  # image 1: best own caption (3, 0.25) has 4 above it -> rank 4
        [0.7, 0.6, 0.5, 0.45, 0.32, 0.22],  # image 2: best own caption (4, 0.32) -> rank 4
    ]
)
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]


def test_recalls_on_a_hand_built_matrix():
    result = retrieval_recalls(SCORES, SCORES.T, IMG2TXT, TXT2IMG)
    # i2t ranks: 0, 4, 4 -> R@1 1/3, R@5 3/3
    assert result["txt_r1"] == pytest.approx(100 / 3) and result["txt_r5"] == 100 and result["txt_r10"] == 100
    # t2i, per caption column, the rank of its own image: c0 2, c1 0, c2 2, c3 1, c4 1, c5 2
    assert result["img_r1"] == pytest.approx(100 / 6) and result["img_r5"] == 100
    assert result["txt_r_mean"] == pytest.approx((100 / 3 + 100 + 100) / 3)
    ties = SCORES.clone()
    ties[1, 3] = 0.95  # image 1's caption 3 now ties the top score: a tie counts against the model
    assert retrieval_recalls(ties, ties.T, IMG2TXT, TXT2IMG)["txt_r1"] == pytest.approx(100 / 3)
    assert result["r_mean"] == pytest.approx((result["txt_r_mean"] + result["img_r_mean"]) / 2)


def test_recalls_equal_torchmetrics_hit_rate():
    torch.manual_seed(0)
    scores = torch.randn(7, 21)
    img2txt = [list(range(3 * i, 3 * i + 3)) for i in range(7)]
    txt2img = [t // 3 for t in range(21)]
    ours = retrieval_recalls(scores, scores.T, img2txt, txt2img)
    for k in (1, 5, 10):
        i2t_target = torch.zeros(7, 21, dtype=torch.bool)
        for i, texts in enumerate(img2txt):
            i2t_target[i, texts] = True
        index = torch.arange(7)[:, None].expand(7, 21)
        theirs = RetrievalHitRate(top_k=k)(scores.flatten(), i2t_target.flatten(), indexes=index.flatten())
        assert ours[f"txt_r{k}"] == pytest.approx(100 * theirs.item())
        t2i_target = i2t_target.T
        index = torch.arange(21)[:, None].expand(21, 7)
        theirs = RetrievalHitRate(top_k=k)(scores.T.flatten(), t2i_target.flatten(), indexes=index.flatten())
        assert ours[f"img_r{k}"] == pytest.approx(100 * theirs.item())


def test_not_ranked_positives_are_never_hits():
    scores = torch.full((1, 20), NOT_RANKED)
    scores[0, :3] = torch.tensor([3.0, 2.0, 1.0])  # top-3 re-ranked, the positive (19) left at -100
    assert retrieval_recalls(scores, scores.T, [[19]], [0] * 20)["txt_r10"] == 0


# --- re-rank -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Stage1Model(preset("tiny")).eval()


def features(model, images=5, texts=7):
    pixels = torch.randn(images, 3, 32, 32)
    ids = torch.randint(1000, 30000, (texts, 6))
    mask = torch.ones_like(ids)
    mask[::2, 4:] = 0
    embeds, feats, readable = compute_image_features(model, lambda c: (pixels[c * 2 : c * 2 + 2], [0, 1][: 5 - 2 * c]), [2, 2, 1])
    assert readable.all()
    return RetrievalFeatures(embeds, feats, compute_text_features(model, ids, mask, text_chunk=3), ids, mask)


def test_rerank_with_all_candidates_is_the_full_itm_ranking(tiny_model):
    f = features(tiny_model)
    sim = itc_similarity(f.image_feats, f.text_feat)
    score_i2t, score_t2i = rerank(tiny_model, f, sim, k=100, batch_size=4)
    with torch.no_grad():
        full = torch.stack([
            tiny_model.itm_logits(f.image_embeds[i].expand(7, -1, -1), f.input_ids, f.attention_mask)[:, 1] for i in range(5)
        ]) + sim
    torch.testing.assert_close(score_i2t, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score_t2i, full.T, atol=1e-5, rtol=1e-5)


def test_rerank_keeps_minus_100_outside_the_top_k(tiny_model):
    f = features(tiny_model)
    sim = itc_similarity(f.image_feats, f.text_feat)
    score_i2t, score_t2i = rerank(tiny_model, f, sim, k=2)
    assert ((score_i2t != NOT_RANKED).sum(1) == 2).all() and ((score_t2i != NOT_RANKED).sum(1) == 2).all()
    for i in range(5):  # the re-ranked entries are exactly the ITC top-2
        assert set((score_i2t[i] != NOT_RANKED).nonzero().flatten().tolist()) == set(sim[i].topk(2).indices.tolist())


def test_itc_only_ranks_by_itc(tiny_model, tmp_path):
    data = tmp_path / "data"
    make_dataset(data, num_images=30, seed=3)
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    model = Stage1Model(config).eval()
    evalset = EvalSet.load(str(data / "test.json"), str(data))
    result, score_i2t, score_t2i = evaluate_retrieval(model, tokenizer, evalset, itc_only=True, batch_size=2, show_progress=False)
    # the same similarity computed here from the model's own methods, image by image, caption by caption
    transform = eval_transform(32)
    captions = [clean_caption(c) for e in evalset.entries for c in e.captions]
    tokens = tokenizer(captions, padding="max_length", max_length=config.max_text_length, return_tensors="pt")
    with torch.no_grad():
        pixels = torch.stack([transform(read_rgb(data / e.image)) for e in evalset.entries])
        image_feats = model.image_feats(model.query_forward(model.encode_image(pixels)).last_hidden_state)
        sim = model.itc_similarity(image_feats, model.text_feat(tokens["input_ids"], tokens["attention_mask"]))
    torch.testing.assert_close(score_i2t, sim, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score_t2i, sim.T, atol=1e-5, rtol=1e-5)
    txt2img = [i for i, e in enumerate(evalset.entries) for _ in e.captions]
    img2txt = [[t for t, i in enumerate(txt2img) if i == image] for image in range(len(evalset.entries))]
    assert result["r_mean"] == retrieval_recalls(sim, sim.T, img2txt, txt2img)["r_mean"]


# --- sharded evaluation -------------------------------------------------------------------------------
def _eval_worker(rank, world, init_file, export, data, out):
    import torch.distributed as dist

    from qformer.folders import load_stage1

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, tokenizer = load_stage1(export)
    evalset = EvalSet.load(str(Path(data) / "test.json"), data)
    share = WorkShare(rank, world, reduce_sum)
    result, score_i2t, score_t2i = evaluate_retrieval(model, tokenizer, evalset, k_test=4, batch_size=3, share=share, show_progress=False)
    if rank == 0:
        torch.save({"result": result, "i2t": score_i2t, "t2i": score_t2i}, out)
    if world > 1:
        dist.destroy_process_group()


def in_this_process(worker, *args):
    """A worker run as the one-process reference in the test's own process (a spawn less): its thread count undone."""
    threads = torch.get_num_threads()
    try:
        worker(*args)
    finally:
        torch.set_num_threads(threads)


def test_two_process_retrieval_is_identical_to_one(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, num_images=40, seed=5)
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    export = save_stage1(Stage1Model(config), tokenizer, tmp_path / "export")
    os.environ["OMP_NUM_THREADS"] = "1"
    in_this_process(_eval_worker, 0, 1, "", str(export), str(data), str(tmp_path / "one.pt"))  # the one process: this one
    processes.spawn(_eval_worker, (2, str(tmp_path / "init"), str(export), str(data), str(tmp_path / "two.pt")), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert torch.equal(one["i2t"], two["i2t"]) and torch.equal(one["t2i"], two["t2i"])
    assert one["result"] == two["result"]


def _vqa_worker(rank, world, port, export, data, out):
    import stages.eval.vqa as vqa

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    generate, asked = vqa.generate_for_images, []
    vqa.generate_for_images = lambda model, tokenizer, images, *rest: asked.extend(images) or generate(model, tokenizer, images, *rest)
    try:
        _vqa_command(export, data, out)
    finally:
        vqa.generate_for_images = generate  # the one-process run is in the test's own process
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    Path(f"{out}.rank{rank}").write_text(json.dumps(asked))
    if rank == 0:
        Path(out).write_text(json.dumps({"scores": json.loads(Path(f"{out}.scores.json").read_text()),
                                         "answers": json.loads(Path(f"{out}.answers.json").read_text())}))


def _vqa_command(export, data, out):
    from stages.cli import main

    assert main(["eval", "vqa", "--model", export, "--data", str(Path(data) / "test_vqa.json"), "--images", data, "--batch-size", "3",
                 "--json", f"{out}.scores.json", "--predictions", f"{out}.answers.json", "--no-progress"]) == 0


def test_two_process_vqa_is_identical_to_one(tmp_path, monkeypatch):
    """eval vqa splits its images over torchrun's processes like the other two evaluations, and gathers the answers."""
    import socket

    from tiny_models import write_stage2

    data = tmp_path / "data"
    make_dataset(data, num_images=60, seed=6, val_images=10, test_images=11)  # 11 images: the two shares differ in size
    write_stage2(data, tmp_path / "stage2")
    os.environ["OMP_NUM_THREADS"] = "1"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that what the one-process run below sets here is undone after
    in_this_process(_vqa_worker, 0, 1, port, str(tmp_path / "stage2"), str(data), str(tmp_path / "one.json"))
    processes.spawn(_vqa_worker, (2, port, str(tmp_path / "stage2"), str(data), str(tmp_path / "two.json")), nprocs=2)
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert one["scores"]["questions"] == 11 and one["scores"]["skipped_images"] == 0
    assert one == two
    shares = [json.loads((tmp_path / f"two.json.rank{rank}").read_text()) for rank in (0, 1)]
    assert sorted(len(share) for share in shares) == [5, 6] and not set(shares[0]) & set(shares[1])  # each image asked once


# --- captioning and VQA metrics ----------------------------------------------------------------------
def test_caption_metrics_match_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    predictions = {"1": "a red circle on the left.", "2": "two blue squares", "3": "A small dog"}
    references = {
        "1": ["A red circle, on the left!", "a red round shape"],
        "2": ["two squares that are blue", "blue squares"],
        "3": ["a small brown dog", "the dog is small", "a puppy"],
    }
    scores, _ = caption_metrics(predictions, references, tokenizer="python", meteor="off")
    refs = {k: [simple_tokenize(c) for c in v] for k, v in references.items()}
    preds = {k: [simple_tokenize(v)] for k, v in predictions.items()}
    assert refs["1"][0] == "a red circle on the left"
    assert scores["bleu4"] == pytest.approx(100 * Bleu(4).compute_score(refs, preds)[0][3])
    assert scores["bleu1"] == pytest.approx(100 * Bleu(4).compute_score(refs, preds)[0][0])
    assert scores["cider"] == pytest.approx(100 * Cider().compute_score(refs, preds)[0])
    assert scores["rouge_l"] == pytest.approx(100 * Rouge().compute_score(refs, preds)[0])
    assert 0 < scores["bleu1"] <= 100 and scores["cider"] > 0


def test_vqa_accuracy_on_hand_made_answers():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0
    # two of ten humans said "2": leaving one of them out leaves 1 match (1/3), else 2 matches (2/3)
    assert vqa_accuracy("two", ["2", "2"] + ["3"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("Red.", ["red"] * 4 + ["dark red"] * 6) == 1.0  # >= 3 matches in every subset
    assert normalize_answer("The Dog's ball!") == "dog's ball"
    assert normalize_answer("dont know") == "don't know"


# --- bad input --------------------------------------------------------------------------------------
def test_missing_images_are_reported_and_counted(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, num_images=20, seed=2)
    entries = json.loads((data / "test.json").read_text())
    entries.append({"image": "images/nowhere.png", "caption": ["a lost image"], "image_id": 999})
    (data / "test.json").write_text(json.dumps(entries))
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    export = save_stage1(Stage1Model(config), tokenizer, tmp_path / "export")
    out = tmp_path / "scores.json"
    code = main(["eval", "retrieval", "--model", str(export), "--data", str(data / "test.json"), "--images", str(data),
                 "--k-test", "3", "--json", str(out), "--no-progress", "--save-scores", str(tmp_path / "s.pt")])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["skipped_images"] == 1 and result["images"] == len(entries) - 1
    assert "nowhere.png" in capsys.readouterr().err
    assert set(result) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    saved = torch.load(tmp_path / "s.pt")
    assert ((saved["score_i2t"] != NOT_RANKED).sum(1) == 3).all()


def test_question_file_in_the_wrong_format(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="expected a non-empty list of questions"):
        load_questions(str(path))
    path.write_text(json.dumps([{"image": "a.png", "question": "what?"}]))
    with pytest.raises(ValueError, match="entry 0 needs 'image', 'question' and 'answer'"):
        load_questions(str(path))
