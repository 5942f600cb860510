"""Stage 2: label masking, loading the stage-1 Q-Former, freezing, CPU training, caption/ask commands."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from qformer.bert import load_tokenizer
from qformer.config import LanguageModelConfig, preset
from qformer.folders import load_stage2, save_stage1
from qformer.lm_text import IGNORE, decoder_only_batch, encoder_decoder_batch, split_caption
from qformer.stage1 import Stage1Model
from qformer.stage2 import Stage2Model
from stages.cli import main
from stages.data.synthetic import make_dataset
from stages.train.stage2 import Stage2Module

ROOT = Path(__file__).resolve().parents[1]
OPT = dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
           word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    make_dataset(folder, num_images=60, seed=1)
    return folder


@pytest.fixture(scope="module")
def stage1_export(data, tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    return save_stage1(Stage1Model(config), tokenizer, tmp_path_factory.mktemp("stage1"))


def lm_tokenizer(data, kind):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(data / f"lm_tokenizer_{kind}"), local_files_only=True)


def test_decoder_only_labels(data):
    tok = lm_tokenizer(data, "decoder")
    batch = decoder_only_batch(tok, ["a red circle", "a blue square to the left of a red circle"], prompt="a photo of ", eos_text="</s>")
    ids, labels = batch.input_ids, batch.labels
    words = lambda row: tok.convert_ids_to_tokens(ids[row])  # noqa: E731
    assert words(0)[:8] == ["</s>", "a", "photo", "of", "a", "red", "circle", "</s>"]  # BOS, prompt, text, eos
    # labels: not BOS, not the prompt, not padding; the text and the closing eos are
    assert labels[0, :4].tolist() == [IGNORE] * 4
    assert labels[0, 4:8].tolist() == ids[0, 4:8].tolist()
    assert labels[0, 8:].tolist() == [IGNORE] * (ids.shape[1] - 8)  # padding
    assert (batch.attention_mask[0, 8:] == 0).all() and (labels[1] != IGNORE).sum() == 11


def test_encoder_decoder_labels(data):
    tok = lm_tokenizer(data, "t5")
    batch = encoder_decoder_batch(tok, ["a red", "a"], ["circle", "blue square"])
    assert tok.convert_ids_to_tokens(batch.input_ids[0]) == ["a", "red", "</s>"]
    assert tok.convert_ids_to_tokens(batch.labels[1]) == ["blue", "square", "</s>"]
    assert batch.labels[0].tolist()[2:] == [IGNORE]  # padding of the shorter target
    assert batch.labels[0, :2].tolist() == tok(["circle"])["input_ids"][0]


def test_split_caption_between_first_word_and_middle():
    rng = random.Random(0)
    cuts = set()
    for _ in range(200):
        prefix, suffix = split_caption("a small red circle to the left of a square", rng)
        assert f"{prefix} {suffix}" == "a small red circle to the left of a square"
        cuts.add(len(prefix.split()))
    assert cuts == {1, 2, 3, 4, 5}
    assert split_caption("circle", rng) == ("", "circle")


@pytest.mark.parametrize(
    "lm,hidden,expected",
    [("opt", 2560, 107_133_696), ("opt", 4096, 108_314_880), ("t5", 2048, 106_739_968), ("t5", 4096, 108_314_880)],
)
def test_paper_stage2_trainable_parameters_on_meta_device(lm, hidden, expected):
    config = preset("vitg")
    lm_config = dict(model_type="opt", hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=1, num_attention_heads=32)
    if lm == "t5":
        lm_config = dict(model_type="t5", d_model=hidden, num_layers=1, vocab_size=32128)
    config.language_model = LanguageModelConfig(config=lm_config)
    with torch.device("meta"):
        model = Stage2Model(config)
    assert model.trainable_parameters() == expected  # LAVIS log (OPT-2.7B) and LAVIS's structure recounted


def test_stage1_weights_loaded_and_one_step_trains_only_the_bridge(stage1_export, data):
    module = Stage2Module(str(stage1_export), lm_config=OPT, lm_tokenizer=str(data / "lm_tokenizer_decoder"), lm_precision="fp32", eos_text="</s>")
    model = module.model
    exported = load_file(str(stage1_export / "model.safetensors"))
    for key in ("qformer.query_tokens", "qformer.layers.0.cross_attn.key.weight", "qformer.layers.1.query_ffn.fc2.weight", "ln_vision.weight"):
        assert torch.equal(model.state_dict()[key], exported[key]), key
    assert not any(".text_ffn." in k or "word_embeddings" in k for k in model.state_dict())

    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("language_model.", "visual_encoder."))}
    bridge = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("qformer.", "language_projection."))}
    model.train()
    assert not model.language_model.training and not model.visual_encoder.training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = module._loss({"pixel_values": torch.randn(4, 3, 32, 32), **module.lm_text(["a red circle"] * 4, [(0, i) for i in range(4)])})
    loss.backward()
    optimizer.step()
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    assert not torch.equal(model.language_projection.weight, bridge["language_projection.weight"])
    assert not torch.equal(model.qformer.query_tokens, bridge["qformer.query_tokens"])
    assert all(p.grad is None for p in model.language_model.parameters())


def test_captions_are_tokenized_once_by_the_lm_tokenizer_in_the_data_loader(stage1_export, data, monkeypatch):
    """The batch carries the LM's input and labels made by the data loader's collate (the workers, when there are
    some); the training step tokenizes nothing, and no BERT tokens are made for stage 2."""
    from stages.data.captions import CaptionDataModule

    module = Stage2Module(str(stage1_export), lm_config=OPT, lm_tokenizer=str(data / "lm_tokenizer_decoder"), lm_precision="fp32",
                          eos_text="</s>", max_text_length=24)
    datamodule = CaptionDataModule(str(data / "train.json"), str(data), image_size=32, batch_size=4)
    datamodule.setup("fit")
    datamodule.use_text_encoder(*module.text_encoder())
    batch = next(iter(datamodule.train_dataloader()))
    expected = decoder_only_batch(module.lm_tokenizer, batch["captions"], "", "</s>", 24).as_kwargs()
    assert "input_ids" not in batch and set(batch["lm_text"]) == set(expected)
    for key, value in expected.items():
        assert torch.equal(batch["lm_text"][key], value), key
    monkeypatch.setattr(type(module.lm_tokenizer), "__call__", lambda *args, **kwargs: pytest.fail("tokenized in the step"))
    assert torch.isfinite(module._loss(batch))


def test_data_max_length_other_than_the_models_text_length_is_one_line(stage1_export, data, capsys):
    argv = ["stage2", "fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--model.stage1", str(stage1_export),
            "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder"), "--data.train", str(data / "train.json"),
            "--data.val", str(data / "val.json"), "--data.image_root", str(data), "--data.max_length", "20",
            "--model.max_text_length", "32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("qformer stage2: error: data.max_length is 20 but the model's model.max_text_length is 32: leave "
                       "data.max_length out (the model's setting is used) or make them equal"), err


def test_prefix_suffix_split_is_drawn_per_sample_and_epoch(monkeypatch):
    """FlanT5 pre-training splits each caption at a random word, drawn from (seed, epoch, index): the same in a
    resumed run, in any data worker, and different from one epoch to the next."""
    import stages.train.stage2 as stage2

    monkeypatch.setattr(stage2, "encoder_decoder_batch", lambda tokenizer, prefixes, targets, max_length: prefixes)
    captions = ["a small red circle on the left of a large blue square"] * 8
    split = stage2.LanguageModelText(None, True, "", None, 32, split_seed=0)
    first, second = (split.batch(captions, [(epoch, i) for i in range(8)]) for epoch in (0, 1))
    again = split.batch(captions, [(0, i) for i in reversed(range(8))])
    assert len(set(first)) > 1  # samples are split at different words
    assert first != second  # and differently in the next epoch
    assert list(reversed(again)) == first  # a sample's split depends on its key, not on its place in the batch


def test_stage2_rejects_a_wrong_stage1_folder(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="qformer_export.json"):
        Stage2Module(str(tmp_path), lm_config=OPT, lm_tokenizer=str(data / "lm_tokenizer_decoder"))


def test_t5_refuses_fp16():
    config = preset("tiny")
    config.language_model = LanguageModelConfig(config=dict(model_type="t5", d_model=16, num_layers=1), precision="fp16")
    with pytest.raises(ValueError, match="fp16 overflows"):
        Stage2Model(config)


@pytest.mark.parametrize("config_name", ["tiny.yaml", "tiny_t5.yaml"])
def test_cpu_fit_loss_decreases_and_caption_command_works(config_name, stage1_export, data, tmp_path, capsys, without_java):
    root = tmp_path / "runs"
    kind = "t5" if "t5" in config_name else "decoder"
    argv = [
        "stage2", "fit", "--config", str(ROOT / "configs" / "stage2" / config_name), "--model.stage1", str(stage1_export),
        "--model.lm_tokenizer", str(data / f"lm_tokenizer_{kind}"),
        "--data.train", str(data / "train.json"), "--data.val", str(data / "val.json"), "--data.image_root", str(data),
        # 24 steps, 3 validations: the loss falls by ~0.1 (OPT) and ~0.8 (T5) between the first and last two logged
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", "24", "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false",
    ]
    assert main(argv) == 0
    import csv

    with open(next(root.rglob("metrics.csv"))) as f:
        losses = [float(r["train/loss_lm"]) for r in csv.DictReader(f) if r.get("train/loss_lm")]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    with open(next(root.rglob("metrics.csv"))) as f:
        assert [r["val/cider"] for r in csv.DictReader(f) if r.get("val/cider")]  # caption validation ran

    export = tmp_path / "export"
    assert main(["export", str(next(root.rglob("*.ckpt"))), "--out", str(export)]) == 0
    model, _ = load_stage2(export)
    assert model.is_encoder_decoder == (kind == "t5")

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(images / "rgb.png")
    Image.new("L", (50, 40), 90).save(images / "gray.png")
    Image.new("RGBA", (50, 40), (0, 0, 255, 128)).save(images / "rgba.png")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    capsys.readouterr()
    code = main(["caption", "--model", str(export), str(images), "--json", "--num-beams", "2", "--max-new-tokens", "5", "--min-new-tokens", "1", "--prompt", ""])
    out = capsys.readouterr()
    assert code == 1  # one unreadable file
    captions = json.loads(out.out)
    assert sorted(Path(c["image"]).name for c in captions) == ["gray.png", "rgb.png", "rgba.png"]
    assert all(isinstance(c["caption"], str) for c in captions)
    assert "corrupt.jpg" in out.err
    assert main(["ask", str(images / "rgb.png"), "what color is the shape?", "--model", str(export)]) == 0

    questions = [{"question_id": n, "image": e["image"], "question": "what color is the shape?", "answer": [e["objects"][0]["color"]] * 10}
                 for n, e in enumerate(json.loads((data / "test.json").read_text()))]
    questions.append({"question_id": 99, "image": "images/missing.png", "question": "what?", "answer": ["x"] * 10})
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    scores_file = tmp_path / "vqa.json"
    assert main(["eval", "vqa", "--model", str(export), "--data", str(tmp_path / "questions.json"), "--images", str(data),
                 "--json", str(scores_file), "--no-progress", "--num-beams", "2"]) == 0
    scores = json.loads(scores_file.read_text())
    assert scores["questions"] == len(questions) - 1 and scores["skipped_images"] == 1 and 0 <= scores["accuracy"] <= 100
    assert main(["eval", "caption", "--model", str(export), "--data", str(data / "test.json"), "--images", str(data),
                 "--json", str(tmp_path / "cap.json"), "--predictions", str(tmp_path / "preds.json"), "--no-progress",
                 "--num-beams", "2", "--max-new-tokens", "5", "--min-new-tokens", "1", "--prompt", ""]) == 0
    caption_scores = json.loads((tmp_path / "cap.json").read_text())
    assert {"bleu4", "cider", "rouge_l"} <= set(caption_scores)
    predictions = json.loads((tmp_path / "preds.json").read_text())
    assert len(predictions) == caption_scores["images"] and {"image_id", "caption"} == set(predictions[0])


def newline_bpe():
    """A byte-level BPE (OPT's, SmolLM2's kind) in which "\\n\\n" is one token, as in the released vocabularies."""
    from test_prompt_masking import byte_level_bpe

    return byte_level_bpe(["Question: what color is it? Answer: red\n\n", "Question: what shape? Answer: a circle\n"] * 50)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_ends_at_every_token_holding_the_end_text_and_at_the_eos_token(num_beams):
    """An LM that would answer with its eos token or "\\n\\n" once `min_new_tokens` holds back "\\n" gets no empty
    answer: those end the text too, so they are held back as well and the answer is the next-best word."""
    from qformer.generation import GenerationSettings, generate_text

    tokenizer = newline_bpe()
    newline, blank_line, red = (tokenizer.convert_tokens_to_ids(t) for t in ("Ċ", "ĊĊ", "Ġred"))
    assert tokenizer.unk_token_id not in (newline, blank_line, red) and None not in (newline, blank_line, red)
    config = preset("tiny")
    config.language_model = LanguageModelConfig(config=dict(OPT, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=1, pad_token_id=0),
                                                precision="fp32", eos_text="\n")
    model = Stage2Model(config).eval()
    decoder, head = model.language_model.model.model.decoder, model.language_model.model.lm_head
    with torch.no_grad():  # the last hidden state is the final norm's bias at every position: fixed logits
        decoder.final_layer_norm.weight.zero_()
        decoder.final_layer_norm.bias.fill_(1.0)
        head.weight.zero_()
        # the logits rank "\n" > the eos token > "\n\n" > " red" > the rest
        head.weight[newline], head.weight[tokenizer.eos_token_id], head.weight[blank_line], head.weight[red] = 3.0, 2.5, 2.0, 1.0
    settings = GenerationSettings(num_beams=num_beams, max_new_tokens=5, min_new_tokens=1)
    assert generate_text(model, tokenizer, torch.randn(1, 3, 32, 32), ["Question: what color is it? Answer:"], settings) == ["red"]
