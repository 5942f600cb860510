"""The instruction-aware Q-Former (InstructBLIP, `qformer_text_input`): model, LM text, loading, training, generation."""

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from qformer.bert import load_tokenizer
from qformer.config import LanguageModelConfig, preset
from qformer.folders import is_text_weight, load_stage2, save_stage2
from qformer.generation import GenerationSettings, generate_text
from qformer.instruction import instruction_tokens
from qformer.lm_text import IGNORE, decoder_only_batch
from qformer.stage2 import Stage2Model
from stages.data.synthetic import make_dataset
from stages.train.stage2 import Stage2Module

from tiny_models import write_stage1

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEMPLATES = CONFIGS / "instruct" / "templates.yaml"
OPT = dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
           word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    make_dataset(folder, num_images=20, seed=1)  # 2 test images
    return folder


@pytest.fixture(scope="module")
def stage1_export(data, tmp_path_factory):
    return write_stage1(data, tmp_path_factory.mktemp("stage1"))


def instruct_model(data, text_input=True, lm=OPT):
    config = preset("tiny")
    config.qformer_config.vocab_size = len(load_tokenizer(data))
    config.qformer_config.hidden_dropout_prob = config.qformer_config.attention_probs_dropout_prob = 0.0
    config.language_model = LanguageModelConfig(config=lm, precision="fp32", tokenizer=str(data / "lm_tokenizer_decoder"), eos_text="</s>")
    config.qformer_text_input = text_input
    model = Stage2Model(config).eval()
    model.instruction_tokenizer = load_tokenizer(data) if text_input else None
    return model


def test_a_plain_model_has_no_text_side_and_an_instruction_aware_one_has_it(data):
    plain, aware = instruct_model(data, False), instruct_model(data, True)
    assert not any(is_text_weight(k) for k in plain.state_dict())
    text = {k for k in aware.state_dict() if is_text_weight(k)}
    assert "qformer.embeddings.word_embeddings.weight" in text and "qformer.layers.1.text_ffn.fc1.weight" in text
    assert set(plain.state_dict()) == set(aware.state_dict()) - text


def test_the_instruction_changes_the_soft_prompts_and_its_padding_does_not(data):
    model = instruct_model(data)
    tokenizer = model.instruction_tokenizer
    pixels = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    with torch.no_grad():
        for p in model.qformer.parameters():  # trained-size weights: at the 0.02 init the queries barely read the text
            p.add_(0.3 * torch.randn_like(p))
        two = instruction_tokens(tokenizer, ["a red circle", "a blue square to the left of a red circle"])
        prompts = model.soft_prompts(pixels, **two)  # (2, Q, H): one image, two instructions
        assert prompts.shape == (2, model.config.num_query_tokens, model.language_model.width)
        assert not torch.allclose(prompts[0], prompts[1], atol=1e-3)
        alone = model.soft_prompts(pixels[:1], **instruction_tokens(tokenizer, ["a red circle"]))  # no padding at all
    assert two["qformer_attention_mask"][0].sum() < two["qformer_attention_mask"].shape[1]  # row 0 was padded
    torch.testing.assert_close(prompts[:1], alone, atol=1e-5, rtol=1e-5)


def test_each_kind_of_model_refuses_the_other_kinds_input(data):
    pixels, ids, mask = torch.randn(1, 3, 32, 32), torch.tensor([[2, 5, 6]]), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="needs qformer_input_ids"):
        instruct_model(data, True)(pixels, ids, mask, ids)
    with pytest.raises(ValueError, match="qformer_text_input=False"):
        instruct_model(data, False)(pixels, ids, mask, ids, qformer_input_ids=torch.tensor([[2, 3]]))


def test_instructions_are_truncated_from_the_left_keeping_cls_and_sep(data):
    tokenizer = load_tokenizer(data)
    long = " ".join(["red"] * 200 + ["circle"])
    ids = instruction_tokens(tokenizer, [long, "a red circle"])["qformer_input_ids"]
    assert ids.shape == (2, 128)
    words = tokenizer.convert_ids_to_tokens(ids[0])
    assert words[0] == "[CLS]" and words[-2:] == ["circle", "[SEP]"]
    assert tokenizer.truncation_side == "right"  # the tokenizer is left as it was


def test_per_sample_instructions_are_masked_and_only_the_outputs_are_in_the_loss(data):
    """Decoder-only InstructBLIP: [BOS ; instruction ; output + eos], right-padded, labels on output + eos only."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data / "lm_tokenizer_decoder"), local_files_only=True)
    instructions = ["what is the color of the circle ?", "a photo of"]
    batch = decoder_only_batch(tok, ["red", "a blue square"], prompt=instructions, eos_text="</s>")
    for row, (instruction, output) in enumerate(zip(instructions, ["red", "a blue square"])):
        ids, labels = batch.input_ids[row].tolist(), batch.labels[row].tolist()
        labelled = [i for i, label in zip(ids, labels) if label != IGNORE]
        assert tok.convert_ids_to_tokens(labelled) == output.split() + ["</s>"]
        masked = [i for i, label, real in zip(ids, labels, batch.attention_mask[row].tolist()) if label == IGNORE and real]
        assert tok.convert_ids_to_tokens(masked) == ["</s>"] + instruction.split()  # BOS + the instruction
    assert batch.attention_mask[1, -1] == 0 and batch.labels[1, -1] == IGNORE  # right padding, out of the loss


def test_training_from_stage1_keeps_the_text_weights_and_trains_them(stage1_export, data):
    module = Stage2Module(str(stage1_export), lm_config=OPT, lm_tokenizer=str(data / "lm_tokenizer_decoder"), lm_precision="fp32",
                          eos_text="</s>", prompt="a photo of", qformer_text_input=True)
    model = module.model
    exported = load_file(str(stage1_export / "model.safetensors"))
    for key in ("qformer.embeddings.word_embeddings.weight", "qformer.embeddings.position_embeddings.weight",
                "qformer.layers.1.text_ffn.fc1.weight", "qformer.layers.0.query_ffn.fc2.weight"):
        assert torch.equal(model.state_dict()[key], exported[key]), key
    instructions = ["what is the color of the circle ?", "a blue square to the left of"]
    batch = module.lm_text(["red", "a red circle"], [(0, 0), (0, 1)], instructions=instructions)
    expected = instruction_tokens(model.instruction_tokenizer, instructions)
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    words = model.instruction_tokenizer.convert_ids_to_tokens(batch["qformer_input_ids"][1])
    assert words[:4] == ["[CLS]", "a", "blue", "square"]
    lm_words = module.lm_tokenizer.convert_ids_to_tokens(batch["lm_text"]["input_ids"][0])
    assert lm_words[:9] == ["</s>", "what", "is", "the", "color", "of", "the", "circle", "?"]  # the LM reads it too
    model.train()
    loss = module._loss({"pixel_values": torch.randn(2, 3, 32, 32), **batch})
    loss.backward()
    assert model.qformer.embeddings.word_embeddings.weight.grad.abs().sum() > 0  # the instruction reaches the loss
    assert model.qformer.layers[0].text_ffn.fc1.weight.grad.abs().sum() > 0
    # without per-sample instructions the fixed prompt is every sample's instruction
    fixed = module.lm_text(["a red circle"], [(0, 0)])
    assert torch.equal(fixed["qformer_input_ids"], instruction_tokens(model.instruction_tokenizer, ["a photo of"])["qformer_input_ids"])


def test_the_export_keeps_the_switch_and_the_qformer_tokenizer(data, tmp_path):
    model = instruct_model(data)
    folder = save_stage2(model, load_tokenizer_lm(data), tmp_path / "export")
    loaded, _ = load_stage2(folder)
    assert loaded.config.qformer_text_input and (Path(folder) / "tokenizer").is_dir()
    assert loaded.instruction_tokenizer.get_vocab() == model.instruction_tokenizer.get_vocab()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def load_tokenizer_lm(data):
    from qformer.language_model import load_lm_tokenizer

    return load_lm_tokenizer(LanguageModelConfig(tokenizer=str(data / "lm_tokenizer_decoder")))


def test_generation_gives_the_prompt_to_the_qformer_too(data):
    model = instruct_model(data)
    lm_tokenizer = load_tokenizer_lm(data)
    pixels = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    settings = GenerationSettings(num_beams=1, max_new_tokens=4, min_new_tokens=4)
    prompts = ["what is the color of the circle ?", "a red circle to the left of"]
    texts = generate_text(model, lm_tokenizer, pixels, prompts, settings)
    seen = []
    original = model.generate
    model.generate = lambda *args, **kwargs: seen.append(kwargs) or original(*args, **kwargs)
    assert generate_text(model, lm_tokenizer, pixels, prompts, settings) == texts
    assert torch.equal(seen[0]["qformer_input_ids"], instruction_tokens(model.instruction_tokenizer, prompts)["qformer_input_ids"])


@pytest.fixture(scope="module")
def instruct_export(data, tmp_path_factory):
    torch.manual_seed(0)
    return save_stage2(instruct_model(data), load_tokenizer_lm(data), tmp_path_factory.mktemp("instruct") / "export")


@pytest.fixture
def qformer_reads(monkeypatch):
    """The prompts that reach the Q-Former (as `generate_text` tokenises them) and whether the model got the tokens."""
    import qformer.generation

    seen = {"prompts": [], "calls_with_tokens": 0, "calls": 0}
    tokenise = qformer.generation.instruction_tokens

    def recording_tokens(tokenizer, prompts, *args):
        seen["prompts"] += list(prompts)
        return tokenise(tokenizer, prompts, *args)

    generate = Stage2Model.generate

    def recording_generate(self, *args, **kwargs):
        seen["calls"] += 1
        seen["calls_with_tokens"] += kwargs.get("qformer_input_ids") is not None
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(qformer.generation, "instruction_tokens", recording_tokens)
    monkeypatch.setattr(Stage2Model, "generate", recording_generate)
    return seen


def test_eval_vqa_gives_each_question_prompt_to_the_qformer(instruct_export, data, qformer_reads):
    import json

    from stages.eval.common import EvalOptions
    from stages.eval.vqa import eval_vqa

    short = GenerationSettings(num_beams=1, max_new_tokens=2)
    options = EvalOptions(data=str(data / "test_vqa.json"), images=str(data), batch_size=4, no_progress=True)
    assert eval_vqa(model=str(instruct_export), options=options, generation=short) == 0
    questions = [q["question"] for q in json.loads((data / "test_vqa.json").read_text())]
    assert sorted(qformer_reads["prompts"]) == sorted(f"Question: {q} Answer:" for q in questions)
    assert qformer_reads["calls"] == qformer_reads["calls_with_tokens"] > 0


def test_eval_caption_gives_the_caption_prompt_to_the_qformer(instruct_export, data, qformer_reads, without_java):
    from stages.eval.caption import eval_caption
    from stages.eval.common import EvalOptions

    short = GenerationSettings(num_beams=1, max_new_tokens=2)
    options = EvalOptions(data=str(data / "test.json"), images=str(data), batch_size=4, no_progress=True)
    assert eval_caption(model=str(instruct_export), options=options, prompt="a short image caption:", generation=short) == 0
    assert set(qformer_reads["prompts"]) == {"a short image caption:"} and len(qformer_reads["prompts"]) > 0
    assert qformer_reads["calls"] == qformer_reads["calls_with_tokens"] > 0


def test_ask_gives_the_instruction_as_it_is(instruct_export, data, qformer_reads, capsys):
    from stages.apps.generate import ask

    image = next(data.glob("images/*.png"))
    assert ask(str(image), "what is the color of the circle ?", model=str(instruct_export),
               generation=GenerationSettings(num_beams=1, max_new_tokens=2)) == 0
    assert qformer_reads["prompts"] == ["what is the color of the circle ?"] and qformer_reads["calls_with_tokens"] == 1
    assert ask(str(image), "what is it ?", model=str(instruct_export), prompt_template="Question: {} Short answer:",
               generation=GenerationSettings(num_beams=1, max_new_tokens=2)) == 0
    assert qformer_reads["prompts"][-1] == "Question: what is it ? Short answer:"


def test_from_a_plain_stage2_export_the_text_weights_come_from_stage1(stage1_export, data, tmp_path):
    lm = dict(lm_config=OPT, lm_tokenizer=str(data / "lm_tokenizer_decoder"), lm_precision="fp32", eos_text="</s>")
    plain = Stage2Module(str(stage1_export), **lm).model
    with torch.no_grad():
        plain.qformer.query_tokens.add_(1.0)  # as if stage 2 had trained it
    folder = save_stage2(plain, load_tokenizer_lm(data), tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain BLIP-2 stage-2 export.*give model.stage1 too"):
        Stage2Module(init_from=str(folder), qformer_text_input=True, **lm)
    model = Stage2Module(str(stage1_export), init_from=str(folder), qformer_text_input=True, **lm).model
    stage1 = load_file(str(stage1_export / "model.safetensors"))
    for key in ("qformer.embeddings.word_embeddings.weight", "qformer.layers.0.text_ffn.fc2.weight"):
        assert torch.equal(model.state_dict()[key], stage1[key]), key
    assert torch.equal(model.qformer.query_tokens, plain.qformer.query_tokens)  # the rest from the stage-2 export
    with pytest.raises(ValueError, match="give exactly one"):
        Stage2Module(str(stage1_export), init_from=str(folder), **lm)  # both, for a plain model: as before


class RecordInstructions(pl.Callback):
    """Writes each training batch's instructions and the Q-Former's tokens of them, one JSON line per batch."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        ids = batch["qformer_input_ids"].masked_fill(batch["qformer_attention_mask"] == 0, -1).tolist()
        with open(self.path, "a") as f:
            f.write(json.dumps({"instructions": batch["instructions"], "qformer_ids": ids}) + "\n")


def test_instruction_tuning_on_a_mixture_fits_exports_answers_and_evaluates(stage1_export, data, tmp_path, monkeypatch, capsys,
                                                                            without_java):
    """A user's run end to end: stage 2 with an instruction-aware Q-Former on a caption + VQA mixture with templates, then
    export, `qformer ask` and `qformer eval vqa`. Validation captions with the caption task's instruction, as trained."""
    import qformer.generation
    from stages.cli import main
    from stages.data.instructions import load_templates
    from stages.tools.export import export

    val_prompts = []
    generate = qformer.generation.generate_text
    monkeypatch.setattr(qformer.generation, "generate_text",
                        lambda model, tok, pixels, prompts, *a: val_prompts.extend(prompts) or generate(model, tok, pixels, prompts, *a))
    record = tmp_path / "instructions.jsonl"
    callbacks = [{"class_path": "test_instruct.RecordInstructions", "init_args": {"path": str(record)}}]
    mixture = json.dumps([str(data / "train.json"), str(data / "val_vqa.json")])
    assert main(["stage2", "fit", "--config", str(CONFIGS / "stage2" / "tiny.yaml"), "--model.stage1", str(stage1_export),
                 "--model.qformer_text_input", "true", "--model.lm_config", json.dumps(OPT),
                 "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder"), "--model.val_max_new_tokens", "2",
                 "--model.val_num_beams", "1", "--data.train", mixture, "--data.templates", str(TEMPLATES),
                 "--data.val", str(data / "val.json"), "--data.image_root", str(data), "--data.batch_size", "8",
                 "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.default_root_dir", str(tmp_path / "runs"),
                 "--trainer.enable_progress_bar", "false", "--trainer.callbacks", json.dumps(callbacks)]) in (0, None)
    templates = load_templates(TEMPLATES)
    assert val_prompts and set(val_prompts) == {templates["caption"][0]}  # not the empty prompt
    batches = [json.loads(line) for line in record.read_text().splitlines()]
    instructions = [i for b in batches for i in b["instructions"]]
    questions = [i for i in instructions if "?" in i]  # the VQA file's samples, its questions in a vqa template
    assert questions and len(questions) < len(instructions)
    assert all(i in templates["caption"] for i in instructions if i not in questions)
    bert = load_tokenizer(stage1_export / "tokenizer")
    for batch in batches:  # the Q-Former reads each sample's own instruction
        tokens = instruction_tokens(bert, batch["instructions"])
        expected = tokens["qformer_input_ids"].masked_fill(tokens["qformer_attention_mask"] == 0, -1).tolist()
        assert batch["qformer_ids"] == expected
    folder = tmp_path / "export"
    export(str(tmp_path / "runs" / "last.ckpt"), out=str(folder))
    assert load_stage2(folder)[0].config.qformer_text_input
    capsys.readouterr()
    image = str(data / json.loads((data / "test_vqa.json").read_text())[0]["image"])
    assert main(["ask", "--model", str(folder), image, "what color is the circle?", "--max-new-tokens", "2"]) == 0
    assert main(["eval", "vqa", "--model", str(folder), "--data", str(data / "test_vqa.json"), "--images", str(data),
                 "--no-progress", "--max-new-tokens", "2", "--num-beams", "1"]) == 0
    assert "accuracy" in capsys.readouterr().out
