"""The decoder-only loss masks exactly the prompt's tokens, for the tokenizers real LLMs use.

OPT / GPT-2 / SmolLM2 use byte-level BPE and Llama a SentencePiece-style ("▁") BPE. Both are built here with
the `tokenizers` library (trained on a few sentences), so no tokenizer is downloaded: what matters is how
they treat the space between the prompt and the caption, which is the same as in the released vocabularies.
"""

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from qformer.lm_text import IGNORE, decoder_only_batch, resolve_eos_text

CORPUS = ["a photo of a dog", "a photo of a cat on a mat", "Question: what is it? Answer: a dog",
          "a red circle next to a blue square", "an apple"] * 50


def byte_level_bpe(corpus: list[str] = CORPUS):
    """OPT's kind: `</s>` as BOS, no prefix space, the space before a word is part of its token ("Ġa")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>")


def llama_bpe():
    """Llama's kind: `<s>` as BOS, "▁" marks a word start, no pad token (the LM's loader sets eos as pad)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = transformers.LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def supervised_text(tokenizer, batch, row: int) -> str:
    """The text whose tokens carry a label."""
    ids = [i for i, label in zip(batch.input_ids[row].tolist(), batch.labels[row].tolist()) if label != IGNORE]
    return tokenizer.decode(ids)


@pytest.mark.parametrize("make", [byte_level_bpe, llama_bpe], ids=["byte-level (OPT)", "llama"])
@pytest.mark.parametrize("prompt", ["a photo of ", "a photo of", "Question: what is it? Answer:"])
def test_every_caption_token_is_in_the_loss_and_no_prompt_token(make, prompt):
    tokenizer = make()
    captions = ["a dog", "an apple on a mat"] if prompt.endswith(" ") else [" a dog", " an apple on a mat"]
    batch = decoder_only_batch(tokenizer, captions, prompt=prompt, eos_text="</s>")
    for row, caption in enumerate(captions):
        assert supervised_text(tokenizer, batch, row).strip() == caption.strip() + "</s>"
        masked = [i for i, label in zip(batch.input_ids[row].tolist(), batch.labels[row].tolist()) if label == IGNORE]
        assert tokenizer.decode(masked, skip_special_tokens=True).strip() == prompt.strip()


def test_byte_level_bpe_tokenises_the_trailing_space_alone():
    """Why `len(tokenizer(prompt))` is wrong: the prompt alone has one token more than it has in the full text."""
    tokenizer = byte_level_bpe()
    alone = tokenizer("a photo of ")["input_ids"]
    full = tokenizer("a photo of a dog")["input_ids"]
    assert alone[:-1] == full[: len(alone) - 1] and alone[-1] != full[len(alone) - 1]
    assert tokenizer.convert_ids_to_tokens(full[len(alone) - 1]) == "Ġa"  # the caption's first word, kept in the loss
    batch = decoder_only_batch(tokenizer, ["a dog"], prompt="a photo of ", eos_text="</s>")
    assert batch.labels[0, len(alone) - 1] == full[len(alone) - 1]


def test_captions_end_with_a_token_even_when_the_tokenizer_drops_the_eos_text():
    """A tokenizer without a newline token would train captions with no end marker: the eos token takes its place."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "dog": 3}, "<unk>")),
                                                     eos_token="</s>", pad_token="<unk>")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.warns(UserWarning, match="tokenises to nothing"):
        eos = resolve_eos_text(tokenizer, "\n")
    batch = decoder_only_batch(tokenizer, ["a dog"], eos_text=eos)
    assert batch.labels[0].tolist() == [2, 3, 1]


@pytest.mark.parametrize("make, expected", [(byte_level_bpe, "\n"), (llama_bpe, "</s>")], ids=["byte-level (OPT, SmolLM2)", "sentencepiece llama"])
def test_default_end_of_caption_is_a_newline_only_where_it_is_one_token(make, expected):
    """Generation stops at the end text's first token: a SentencePiece Llama's "\\n" starts with "▁" (any space), so
    its captions end with its eos token; byte-level BPEs have "\\n" as one token ("Ċ"), as LAVIS uses it for OPT."""
    tokenizer = make()
    eos = resolve_eos_text(tokenizer, None)
    assert eos == expected and len(tokenizer(eos, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("encoder_decoder, chat_template, expected", [
    (False, None, "Question: {} Answer:"),  # OPT: the BLIP-2 paper's prompt
    (True, None, "Question: {} Short answer:"),  # FlanT5
    (False, "{% for m in messages %}{{ m['content'] }}{% endfor %}", "Question: {} Short answer:"),  # a chat LM (SmolLM2-Instruct)
])
def test_the_vqa_prompt_asks_an_instruction_tuned_lm_for_a_short_answer(encoder_decoder, chat_template, expected):
    from types import SimpleNamespace

    from qformer.generation import vqa_prompt

    tokenizer = byte_level_bpe()
    tokenizer.chat_template = chat_template
    model = SimpleNamespace(is_encoder_decoder=encoder_decoder)
    assert vqa_prompt(model, tokenizer) == expected
    assert vqa_prompt(model, tokenizer, "Q: {} A:") == "Q: {} A:"  # a template given is used as it is
