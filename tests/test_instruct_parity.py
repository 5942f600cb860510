"""Our instruction-aware stage-2 model against transformers' InstructBlipForConditionalGeneration (same weights, float32)."""

import pytest
import torch

from qformer.config import LanguageModelConfig, preset
from qformer.interop.instruct import to_hf_instruct
from qformer.lm_text import IGNORE
from qformer.stage2 import Stage2Model
from test_stage2_parity import IMAGE_TOKEN, LMS, PROMPTS, VOCAB, with_image_tokens

pytestmark = pytest.mark.parity
QFORMER_VOCAB = 1000  # BERT's 30523 words would only slow the models' set-up


@pytest.fixture(scope="module")
def pairs():
    """Per LM family, our model and transformers' with the same weights, built once."""
    built = {}

    def pair(lm: str):
        if lm not in built:
            torch.manual_seed(0)
            config = preset("tiny")
            config.qformer_config.vocab_size = QFORMER_VOCAB
            config.language_model = LanguageModelConfig(config=LMS[lm], precision="fp32")
            config.qformer_text_input = True
            ours = Stage2Model(config).eval()
            with torch.no_grad():  # non-trivial weights: at the 0.02 init the queries barely read the instruction
                ours.language_projection.weight.normal_(0, 0.5)
                ours.ln_vision.weight.normal_(1, 0.1)
                for p in ours.qformer.parameters():
                    p.add_(0.3 * torch.randn_like(p))
            built[lm] = ours, to_hf_instruct(ours, IMAGE_TOKEN)
        return built[lm]

    return pair


def instruction(batch: int):
    """BERT ids of two different instructions, the second row right-padded (the Q-Former hides its padding)."""
    ids = torch.randint(200, QFORMER_VOCAB, (batch, 6))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    ids[-1, 4:], mask[-1, 4:] = 0, 0
    ids[-1, 3] = 102
    return {"qformer_input_ids": ids, "qformer_attention_mask": mask}


@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_decoder_only_loss_matches_instructblip(pairs, lm):
    ours, theirs = pairs(lm)
    Q = ours.config.num_query_tokens
    pixels = torch.randn(3, 3, 32, 32)
    qformer = instruction(3)
    ids = torch.randint(3, VOCAB - 1, (3, 7))  # [BOS ; instruction ; output + eos], the last row right-padded
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    ids[2, 5:] = LMS[lm]["pad_token_id"]
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :3] = IGNORE  # the instruction (and OPT's BOS) out of the loss
    with torch.no_grad():
        loss = ours(pixels, ids, mask, labels, **qformer)
        hf_ids, hf_mask = with_image_tokens(ids, mask, Q)
        # As in test_stage2_parity: transformers' loss from its logits (every position predicts the next).
        logits = theirs(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **qformer).logits
        hf_labels = torch.cat([torch.full((ids.shape[0], Q), IGNORE), labels], 1)
        hf_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), hf_labels[:, 1:].reshape(-1), ignore_index=IGNORE)
        without = ours(pixels, ids, mask, labels, qformer_input_ids=qformer["qformer_input_ids"][:, :2],
                       qformer_attention_mask=qformer["qformer_attention_mask"][:, :2])
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)
    assert abs(loss - without) > 1e-4  # the instruction's tokens change the loss


def test_t5_loss_matches_instructblip(pairs):
    ours, theirs = pairs("t5")
    Q = ours.config.num_query_tokens
    pixels = torch.randn(2, 3, 32, 32)
    qformer = instruction(2)
    prefix, mask = torch.randint(2, VOCAB - 1, (2, 4)), torch.ones(2, 4, dtype=torch.long)  # encoder: the instruction
    target = torch.randint(2, VOCAB - 1, (2, 5))
    target_mask = torch.ones_like(target)
    target_mask[1, 3:] = 0
    labels = target.masked_fill(target_mask == 0, IGNORE)
    with torch.no_grad():
        loss = ours(pixels, prefix, mask, labels, target_mask, **qformer)
        hf_ids, hf_mask = with_image_tokens(prefix, mask, Q)
        hf_loss = theirs(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, labels=labels,
                         decoder_attention_mask=target_mask, **qformer).loss
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm", ["opt", "llama", "t5"])
def test_greedy_ids_match_instructblip(pairs, lm):
    ours, theirs = pairs(lm)
    Q = ours.config.num_query_tokens
    pixels = torch.randn(2, 3, 32, 32)
    qformer = instruction(2)
    prompt = torch.tensor([PROMPTS[lm]] * 2)
    mask = torch.ones_like(prompt)
    kwargs = dict(num_beams=1, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ids = ours.generate(pixels, prompt, mask, **qformer, **kwargs)
        hf_ids, hf_mask = with_image_tokens(prompt, mask, Q)
        hf = theirs.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **qformer, **kwargs)
    if lm != "t5":
        hf = hf[:, hf_ids.shape[1]:]  # transformers returns the prompt ids too
    assert torch.equal(ids, hf), (ids, hf)
    assert ids.shape[1] >= 6
