"""Our stage-2 model against transformers' Blip2ForConditionalGeneration with identical weights (float32)."""

import pytest
import torch

from qformer.config import LanguageModelConfig, preset
from qformer.interop.names import to_hf_generation
from qformer.lm_text import IGNORE
from qformer.stage2 import Stage2Model

pytestmark = pytest.mark.parity

VOCAB = 100
IMAGE_TOKEN = VOCAB - 1  # transformers puts the soft prompts where this placeholder stands
LMS = {
    "opt": dict(model_type="opt", vocab_size=VOCAB, hidden_size=24, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2,
                word_embed_proj_dim=24, max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=1),
    # SmolLM2's shape in small: grouped-query attention, tied embeddings, no BOS added by its tokenizer.
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "t5": dict(model_type="t5", vocab_size=VOCAB, d_model=24, d_ff=48, d_kv=12, num_layers=2, num_heads=2,
               feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
}


def build_pair(lm: str):
    config = preset("tiny")
    config.language_model = LanguageModelConfig(config=LMS[lm], precision="fp32")
    ours = Stage2Model(config).eval()
    with torch.no_grad():  # a non-trivial projection and ln_vision, not the init values
        ours.language_projection.weight.normal_(0, 0.5)
        ours.ln_vision.weight.normal_(1, 0.1)
    return ours, to_hf_generation(ours, IMAGE_TOKEN)


def with_image_tokens(ids, mask, Q):
    B = ids.shape[0]
    return torch.cat([torch.full((B, Q), IMAGE_TOKEN), ids], 1), torch.cat([torch.ones(B, Q, dtype=mask.dtype), mask], 1)


@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_decoder_only_loss_matches(lm):
    ours, theirs = build_pair(lm)
    Q = ours.config.num_query_tokens
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(3, VOCAB - 1, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    ids[2, 5:] = LMS[lm]["pad_token_id"]
    labels = ids.masked_fill(mask == 0, IGNORE)
    if lm == "opt":
        ids[:, 0] = 2  # BOS
        labels[:, :2] = IGNORE  # BOS + a one-token prompt
    else:  # no BOS, no prompt: the first text token is a label, predicted from the last soft prompt
        labels[1, :2] = IGNORE
    with torch.no_grad():
        loss = ours(pixels, ids, mask, labels)
        hf_ids, hf_mask = with_image_tokens(ids, mask, Q)
        # transformers 5.x fails inside its own loss here (view of a sliced tensor), so its loss is recomputed from
        # its logits exactly as its loss_function does: every position predicts the next, the queries have no label.
        logits = theirs(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask).logits
        hf_labels = torch.cat([torch.full((ids.shape[0], Q), IGNORE), labels], 1)
        hf_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), hf_labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)
    # With gradients ours runs eager attention (faster on a CPU, see FrozenLanguageModel.use_attention_for): the
    # same loss as transformers' SDPA.
    assert ours.language_model.model.config._attn_implementation == ours.language_model.own_attention == "sdpa"
    assert theirs.language_model.config._attn_implementation == "sdpa"
    eager_loss = ours(pixels, ids, mask, labels)
    assert ours.language_model.model.config._attn_implementation == "eager"
    torch.testing.assert_close(eager_loss, hf_loss, atol=1e-5, rtol=1e-5)


def test_t5_loss_matches():
    ours, theirs = build_pair("t5")
    Q = ours.config.num_query_tokens
    pixels = torch.randn(2, 3, 32, 32)
    prefix, mask = torch.randint(2, VOCAB - 1, (2, 4)), torch.ones(2, 4, dtype=torch.long)
    target = torch.randint(2, VOCAB - 1, (2, 5))
    target_mask = torch.ones_like(target)
    target_mask[1, 3:] = 0
    labels = target.masked_fill(target_mask == 0, IGNORE)
    with torch.no_grad():
        loss = ours(pixels, prefix, mask, labels, target_mask)
        hf_ids, hf_mask = with_image_tokens(prefix, mask, Q)
        hf_loss = theirs(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, labels=labels, decoder_attention_mask=target_mask).loss
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)


PROMPTS = {"opt": [2, 17, 23], "llama": [17, 23], "t5": [17, 23, 1]}  # OPT's BOS; Llama's tokenizer (SmolLM2) adds none


@pytest.mark.parametrize("lm", ["opt", "llama", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generated_ids_match(lm, num_beams):
    ours, theirs = build_pair(lm)
    Q = ours.config.num_query_tokens
    pixels = torch.randn(2, 3, 32, 32)
    prompt = torch.tensor([PROMPTS[lm]] * 2)
    mask = torch.ones_like(prompt)
    kwargs = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ids = ours.generate(pixels, prompt, mask, **kwargs)
        hf_ids, hf_mask = with_image_tokens(prompt, mask, Q)
        hf = theirs.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **kwargs)
    if lm != "t5":
        hf = hf[:, hf_ids.shape[1]:]  # transformers returns the prompt ids too
    assert torch.equal(ids, hf), (ids, hf)
    assert ids.shape[1] >= 6


@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_left_padded_batch_generates_what_each_prompt_does_alone(lm):
    """Positions with soft prompts: a left-padded row has padding between its soft prompts and its prompt, and its
    positions (from the attention mask) continue after the soft prompts as if there were none."""
    ours, _ = build_pair(lm)
    pixels = torch.randn(2, 3, 32, 32)
    short, long = [5, 9], [7, 11, 13, 17]
    pad = LMS[lm]["pad_token_id"]
    ids = torch.tensor([[pad, pad] + short, long])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    kwargs = dict(num_beams=1, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=pad,
                  return_dict_in_generate=True, output_logits=True)  # logits: a shifted position changes them, if not the ids
    with torch.no_grad():
        batched = ours.generate(pixels, ids, mask, **kwargs)
        alone = [ours.generate(pixels[i : i + 1], torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), **kwargs)
                 for i, p in enumerate([short, long])]
    assert torch.equal(batched.sequences, torch.cat([a.sequences for a in alone]))
    for step, logits in enumerate(batched.logits):
        torch.testing.assert_close(logits, torch.cat([a.logits[step] for a in alone]), atol=1e-5, rtol=1e-5)


# Tiny causal LMs of each family whose head stage 2 runs on the labelled positions only, and one (Gemma 2, whose logits are
# soft-capped after its head: a cap of 0.1 changes them well beyond the tolerance) where the LM applies its own head.
CAUSAL_FAMILIES = {
    "mistral": dict(model_type="mistral", vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128),
    "qwen2": dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=2, n_positions=128),
    "gemma2": dict(model_type="gemma2", vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=12, max_position_embeddings=128, final_logit_softcapping=0.1),
}


@pytest.mark.parametrize("lm", ["opt", "llama", *CAUSAL_FAMILIES])
def test_the_loss_of_every_causal_family_is_the_cross_entropy_of_its_full_logits(lm):
    """Where the head runs on labelled positions only (PLAIN_HEAD_MODEL_TYPES) and where the LM applies its own head."""
    from qformer.language_model import PLAIN_HEAD_MODEL_TYPES

    config = preset("tiny")
    config.language_model = LanguageModelConfig(config=LMS.get(lm) or CAUSAL_FAMILIES[lm], precision="fp32")
    model = Stage2Model(config).eval()
    assert model.language_model.has_plain_head == (lm in PLAIN_HEAD_MODEL_TYPES) == (lm != "gemma2")
    Q = config.num_query_tokens
    pixels, ids = torch.randn(3, 3, 32, 32), torch.randint(3, VOCAB - 1, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :2] = IGNORE  # a two-token prompt
    with torch.no_grad():
        loss = model(pixels, ids, mask, labels)
        embeds, full_mask = model._with_prompts(pixels, ids, mask)
        logits = model.language_model.model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, Q - 1 : -1]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
