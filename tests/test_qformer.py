"""The Q-Former's attention modes, parameter accounting and freezing."""

import pytest
import torch

from qformer.accounting import stage1_parameter_counts
from qformer.config import preset
from qformer.masks import generation_mask, padding_mask, with_queries
from qformer.stage1 import Stage1Model


@pytest.fixture
def model(tiny_config):
    return Stage1Model(tiny_config).eval()


def inputs(batch=2, length=7, vocab=30523):
    pixels = torch.randn(batch, 3, 32, 32)
    input_ids = torch.randint(1000, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -3:] = 0
    return pixels, input_ids, mask


def joint(model, image_embeds, input_ids, mask):
    return model.qformer(input_ids, mask, image_embeds=image_embeds).last_hidden_state


def test_itg_mode_queries_never_see_text(model):
    pixels, ids, text_mask = inputs()
    Q = model.qformer.num_query_tokens
    image_embeds = model.encode_image(pixels)
    mask = generation_mask(Q, text_mask)
    out = joint(model, image_embeds, ids, mask)
    other = joint(model, image_embeds, torch.randint(1000, 30523, ids.shape), mask)
    torch.testing.assert_close(out[:, :Q], other[:, :Q], rtol=0, atol=0)
    # and the query outputs are exactly those of the queries-only (ITC image) pass
    torch.testing.assert_close(out[:, :Q], model.query_forward(image_embeds).last_hidden_state)


def test_itg_mode_is_causal_over_text(model):
    pixels, ids, text_mask = inputs()
    Q = model.qformer.num_query_tokens
    image_embeds = model.encode_image(pixels)
    mask = generation_mask(Q, text_mask)
    changed = ids.clone()
    changed[:, 4] = 2000  # only position 4 and later may change
    a, b = joint(model, image_embeds, ids, mask), joint(model, image_embeds, changed, mask)
    torch.testing.assert_close(a[:, : Q + 4], b[:, : Q + 4], rtol=0, atol=0)
    assert not torch.allclose(a[:, Q + 4], b[:, Q + 4])


def test_itg_with_cached_queries_equals_one_joint_pass(model):
    pixels, ids, text_mask = inputs()
    Q = model.qformer.num_query_tokens
    image_embeds = model.encode_image(pixels)
    full = joint(model, image_embeds, ids, generation_mask(Q, text_mask))
    cached = model.query_forward(image_embeds).query_kv
    text_only = model.qformer(ids, generation_mask(Q, text_mask)[:, :, Q:], use_queries=False, past_query_kv=cached)
    torch.testing.assert_close(text_only.last_hidden_state, full[:, Q:], atol=1e-5, rtol=1e-5)


def test_itg_text_sees_the_image_through_queries(model):
    pixels, ids, text_mask = inputs()
    Q = model.qformer.num_query_tokens
    mask = generation_mask(Q, text_mask)
    a = joint(model, model.encode_image(pixels), ids, mask)
    b = joint(model, model.encode_image(torch.randn_like(pixels)), ids, mask)
    assert not torch.allclose(a[:, Q], b[:, Q])  # even the first text token ([DEC]) sees the queries


def test_padding_never_matters(model):
    pixels, ids, text_mask = inputs()
    image_embeds = model.encode_image(pixels)
    repadded = ids.clone()
    repadded[1, -3:] = 4242  # different garbage under the padding
    Q = model.qformer.num_query_tokens
    real = text_mask.bool()
    for mask in (padding_mask(with_queries(Q, text_mask)), generation_mask(Q, text_mask)):
        a, b = joint(model, image_embeds, ids, mask), joint(model, image_embeds, repadded, mask)
        torch.testing.assert_close(a[:, :Q], b[:, :Q], rtol=0, atol=0)
        torch.testing.assert_close(a[:, Q:][real], b[:, Q:][real], rtol=0, atol=0)
    torch.testing.assert_close(model.text_feat(ids, text_mask), model.text_feat(repadded, text_mask))
    # a padded batch row equals the same text alone without padding
    alone = model.text_feat(ids[1:, :4], text_mask[1:, :4])
    torch.testing.assert_close(model.text_feat(ids, text_mask)[1:], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["itc_text", "itm", "itg"])
def test_padded_text_skips_the_feed_forward_and_changes_no_output_that_is_read(model, mode):
    """With `text_mask` the projections and the text FFN run on the real tokens (and queries) only; every output a
    loss reads is as without it."""
    pixels, ids, text_mask = inputs(batch=3)
    text_mask[2, -5:] = 0
    Q = model.qformer.num_query_tokens
    image_embeds = model.encode_image(pixels)
    query = model.query_forward(image_embeds)
    kwargs = {
        "itc_text": dict(attention_mask=padding_mask(text_mask), use_queries=False),
        "itm": dict(attention_mask=padding_mask(with_queries(Q, text_mask)), image_embeds=image_embeds),
        "itg": dict(attention_mask=generation_mask(Q, text_mask)[:, :, Q:], use_queries=False, past_query_kv=query.query_kv),
    }[mode]
    rows_seen = {}
    layer = model.qformer.layers[0]
    def count_rows(name):
        def hook(module, args, out):
            rows_seen.setdefault(name, args[0].shape[:-1].numel())
        return hook

    hooks = [module.register_forward_hook(count_rows(name)) for name, module in (("text_ffn", layer.text_ffn.fc1), ("self_attn", layer.self_attn.key))]
    try:
        unpadded = model.qformer(ids, text_mask=text_mask, **kwargs).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    padded = model.qformer(ids, **kwargs).last_hidden_state
    text_start = Q if mode == "itm" else 0
    assert rows_seen == {"text_ffn": int(text_mask.sum()), "self_attn": 3 * text_start + int(text_mask.sum())}
    read = torch.cat([torch.ones(3, text_start, dtype=torch.bool), text_mask.bool()], dim=1)  # queries and real tokens
    torch.testing.assert_close(unpadded[read], padded[read], atol=1e-6, rtol=1e-5)


def test_itm_mode_queries_see_text(model):
    pixels, ids, text_mask = inputs()
    image_embeds = model.encode_image(pixels)
    a = model.itm_logits(image_embeds, ids, text_mask)
    b = model.itm_logits(image_embeds, torch.randint(1000, 30523, ids.shape), text_mask)
    assert not torch.allclose(a, b)


def test_text_only_mode_ignores_the_image(model):
    pixels, ids, text_mask = inputs()
    one, other = model.encode_image(pixels), model.encode_image(torch.randn_like(pixels))
    text = [model.qformer(ids, padding_mask(text_mask), image_embeds=image, use_queries=False).last_hidden_state
            for image in (None, one, other)]
    torch.testing.assert_close(text[1], text[0], rtol=0, atol=0)  # no cross-attention from text, whatever is passed
    torch.testing.assert_close(text[2], text[0], rtol=0, atol=0)
    assert text[0].shape == (2, 7, model.config.qformer_config.hidden_size)
    # with the queries in the input (ITM) the same text does depend on the image: the test above could fail
    Q = model.qformer.num_query_tokens
    itm = [joint(model, image, ids, padding_mask(with_queries(Q, text_mask)))[:, Q:] for image in (one, other)]
    assert not torch.allclose(itm[0], itm[1])


def test_generation_mask_layout():
    mask = generation_mask(2, torch.tensor([[1, 1, 0]]))[0, 0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # query 0: queries only
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # text 0: queries + itself
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],  # padding is never a key
        ]
    )
    assert torch.equal(mask, expected)


def test_paper_stage1_trainable_parameters_on_meta_device():
    counts = stage1_parameter_counts(preset("vitg"))
    assert counts["trainable"] == 186_705_470  # LAVIS training log, ViT-g + bert-base + [DEC]
    assert counts["frozen"] > 900_000_000  # 39 EVA ViT-g blocks


def test_vitg_encoder_drops_the_last_block_and_norm():
    with torch.device("meta"):
        model = Stage1Model(preset("vitg"))
    vit = model.visual_encoder.model
    assert len(vit.blocks) == 39 and model.visual_encoder.width == 1408
    assert isinstance(vit.norm, torch.nn.Identity)
    assert model.qformer.query_tokens.shape == (1, 32, 768)
    assert [layer.cross_attn is not None for layer in model.qformer.layers] == [i % 2 == 0 for i in range(12)]


def test_one_step_keeps_encoder_frozen_and_trains_the_rest(tiny_config):
    model = Stage1Model(tiny_config)
    model.train()
    assert not model.visual_encoder.training and model.qformer.training
    frozen_before = {k: v.clone() for k, v in model.visual_encoder.state_dict().items()}
    pixels, ids, text_mask = inputs()
    image_embeds = model.encode_image(pixels)
    query = model.query_forward(image_embeds)
    sim = model.itc_similarity(model.image_feats(query.last_hidden_state), model.text_feat(ids, text_mask))
    itm = model.itm_logits(image_embeds, ids, text_mask)
    itg = model.itg_logits(ids, text_mask, query.query_kv)
    loss = sim.sum() / model.temp + itm.sum() + itg.logsumexp(-1).mean()
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(not n.startswith("visual_encoder.") for n, _ in trainable)
    for name, param in trainable:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    torch.optim.AdamW([p for _, p in trainable], lr=1e-3).step()
    for key, value in model.visual_encoder.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    assert all(p.grad is None for p in model.visual_encoder.parameters())


def test_encoder_precision_auto_is_fp32_on_cpu():
    config = preset("tiny")
    config.vision_config.precision = "auto"
    encoder = Stage1Model(config).visual_encoder
    out = encoder(torch.randn(1, 3, 32, 32))
    assert out.dtype == torch.float32 and next(encoder.parameters()).dtype == torch.float32


def test_encoder_half_precision_weights():
    config = preset("tiny")
    config.vision_config.precision = "bf16"
    encoder = Stage1Model(config).visual_encoder
    assert next(encoder.parameters()).dtype == torch.bfloat16
    assert encoder(torch.randn(1, 3, 32, 32)).dtype == torch.float32
