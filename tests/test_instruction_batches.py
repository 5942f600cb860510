"""Stage-2 batches of instruction data (issue 29): each sample's instruction is its LM prompt, the loss is on the output
only, and an instruction-aware Q-Former's batch carries the instructions in BERT's tokens (only when asked)."""

from types import SimpleNamespace

import pytest
from test_prompt_masking import byte_level_bpe, llama_bpe, supervised_text

from qformer.lm_text import IGNORE
from stages.data.synthetic import write_vocab
from qformer.instruction import instruction_tokens
from stages.train.stage2 import LanguageModelText

INSTRUCTIONS = ["Question: what is it? Answer:", None, "A photo of"]
OUTPUTS = ["a dog", "a cat on a mat", "an apple"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from qformer.bert import load_tokenizer

    folder = tmp_path_factory.mktemp("bert")
    write_vocab(folder, ["question : what is it ? answer : a photo of a dog"])
    return load_tokenizer(folder)


@pytest.mark.parametrize("make", [byte_level_bpe, llama_bpe], ids=["byte-level (OPT)", "llama"])
def test_each_sample_is_prompted_by_its_instruction_and_trains_on_its_output_only(make):
    tokenizer = make()
    text = LanguageModelText(tokenizer, False, prompt="a photo of ", eos_text="</s>", max_length=32, split_seed=0)
    batch = text(OUTPUTS, [(0, i) for i in range(3)], instructions=INSTRUCTIONS)["lm_text"]
    for row, output in enumerate(OUTPUTS):
        assert supervised_text(tokenizer, SimpleNamespace(**batch), row).strip() == output + "</s>"
    masked = [i for i, label in zip(batch["input_ids"][1].tolist(), batch["labels"][1].tolist()) if label == IGNORE]
    assert tokenizer.decode(masked, skip_special_tokens=True).strip() == "a photo of"  # no instruction: the model's prompt
    first = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert first.startswith("Question: what is it? Answer: a dog")  # one space between the instruction and the output


def test_encoder_decoder_instructions_go_to_the_encoder_and_outputs_to_the_decoder():
    tokenizer = llama_bpe()
    text = LanguageModelText(tokenizer, True, prompt="", eos_text=None, max_length=32, split_seed=0)
    batch = text.batch(OUTPUTS[:1] + ["a dog on a mat"], [(0, 0), (0, 1)], ["Question: what is it? Answer:", None])
    assert tokenizer.decode(batch.input_ids[0], skip_special_tokens=True) == "Question: what is it? Answer:"
    assert tokenizer.decode([i for i in batch.labels[0].tolist() if i != IGNORE], skip_special_tokens=True) == "a dog"
    prefix = tokenizer.decode(batch.input_ids[1], skip_special_tokens=True)  # no instruction, no prompt: split at a word
    assert prefix and "a dog on a mat".startswith(prefix)


def test_the_qformer_tokens_come_only_with_an_instruction_aware_model(bert):
    tokenizer = byte_level_bpe()
    plain = LanguageModelText(tokenizer, False, prompt="a photo of ", eos_text="</s>", max_length=32, split_seed=0)
    assert set(plain(OUTPUTS, [(0, i) for i in range(3)], INSTRUCTIONS)) == {"lm_text"}
    aware = LanguageModelText(tokenizer, False, prompt="a photo of ", eos_text="</s>", max_length=32, split_seed=0,
                              qformer_tokenizer=bert)
    batch = aware(OUTPUTS, [(0, i) for i in range(3)], INSTRUCTIONS)
    expected = instruction_tokens(bert, ["Question: what is it? Answer:", "a photo of ", "A photo of"])
    assert batch["qformer_input_ids"].tolist() == expected["qformer_input_ids"].tolist()
    assert batch["qformer_attention_mask"].tolist() == expected["qformer_attention_mask"].tolist()
    ids = batch["qformer_input_ids"][0][batch["qformer_attention_mask"][0].bool()].tolist()
    assert bert.convert_ids_to_tokens(ids) == ["[CLS]", "question", ":", "what", "is", "it", "?", "answer", ":", "[SEP]"]


def test_a_long_instruction_keeps_its_end_in_the_qformer_tokens(bert):
    tokens = instruction_tokens(bert, ["a photo of a dog " * 100 + "what is it"], max_length=128)
    assert tokens["qformer_input_ids"].shape == (1, 128)
    assert bert.convert_ids_to_tokens(tokens["qformer_input_ids"][0].tolist())[-6:] == ["a", "dog", "what", "is", "it", "[SEP]"]
