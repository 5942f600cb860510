"""Our stage-1 model against transformers' Blip2ForImageTextRetrieval with identical weights (float32)."""

import pytest
import torch

from qformer.interop.names import stage1_from_hf, to_hf_retrieval
from qformer.stage1 import Stage1Model

pytestmark = pytest.mark.parity


def build_pair(config):
    ours = Stage1Model(config).eval()
    # LAVIS's ln_vision is a plain LayerNorm (eps 1e-5); transformers reuses the vision eps (1e-6) for its
    # post_layernorm, so the conversion sets it to ours to compare like with like.
    theirs, dropped = to_hf_retrieval(ours)
    assert sorted(dropped) == sorted(k for k in ours.state_dict() if k == "temp" or k.startswith("lm_head."))
    return ours, theirs


def text_batch(batch, length, vocab):
    input_ids = torch.randint(1, vocab, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):  # every row but the first is padded at the end
        pad = (row * 3) % (length - 1)
        if pad:
            attention_mask[row, -pad:] = 0
            input_ids[row, -pad:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("batch,length", [(1, 5), (3, 9), (4, 16)])
def test_itc_and_itm_match_transformers(tiny_config, batch, length):
    ours, theirs = build_pair(tiny_config)
    pixels = torch.randn(batch, 3, 32, 32)
    input_ids, attention_mask = text_batch(batch, length, tiny_config.qformer_config.vocab_size)
    with torch.no_grad():
        image_embeds = ours.encode_image(pixels)
        query_output = ours.query_forward(image_embeds).last_hidden_state
        itc = ours.itc_similarity(ours.image_feats(query_output), ours.text_feat(input_ids, attention_mask))
        itm = ours.itm_logits(image_embeds, input_ids, attention_mask)

        hf_itc = theirs(pixels, input_ids, attention_mask, use_image_text_matching_head=False)
        hf_itm = theirs(pixels, input_ids, attention_mask, use_image_text_matching_head=True)
        hf_image_embeds = theirs.vision_model(pixels).last_hidden_state
        hf_query = theirs.qformer(
            query_embeds=theirs.query_tokens.expand(batch, -1, -1), encoder_hidden_states=hf_image_embeds
        ).last_hidden_state

    torch.testing.assert_close(image_embeds, hf_image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(query_output, hf_query, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itc, hf_itc.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itm, hf_itm.logits_per_image, atol=1e-5, rtol=1e-5)


def test_hf_round_trip_is_bit_identical(tiny_config):
    ours, theirs = build_pair(tiny_config)
    keys = list(ours.state_dict())
    state, not_filled = stage1_from_hf(theirs.state_dict(), keys, eva_biases=False)
    assert sorted(not_filled) == sorted(k for k in keys if k == "temp" or k.startswith("lm_head."))
    for key, value in state.items():
        assert torch.equal(value, ours.state_dict()[key]), key


def test_conversion_rejects_unknown_keys(tiny_config):
    ours, theirs = build_pair(tiny_config)
    state = dict(theirs.state_dict())
    state["qformer.encoder.layer.0.surprise.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="surprise"):
        stage1_from_hf(state, list(ours.state_dict()), eva_biases=False)
    state = dict(theirs.state_dict())
    del state["itm_head.weight"]
    with pytest.raises(KeyError, match="itm_head.weight"):
        stage1_from_hf(state, list(ours.state_dict()), eva_biases=False)
