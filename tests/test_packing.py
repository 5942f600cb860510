"""Stage 2's sequence packing (qformer.packing): two samples per row give the padded batch's hidden states and gradients."""

import pytest
import torch

from qformer.config import LanguageModelConfig, preset
from qformer.language_model import PACKING_MODEL_TYPES, PLAIN_HEAD_MODEL_TYPES, FrozenLanguageModel
from qformer.lm_text import IGNORE
from qformer.packing import pack, plan_packing, right_padded_lengths, unpack
from qformer.stage2 import Stage2Model
from test_stage2_parity import CAUSAL_FAMILIES, LMS, VOCAB

DECODERS = {name: config for name, config in {**LMS, **CAUSAL_FAMILIES}.items() if name in PLAIN_HEAD_MODEL_TYPES}


def right_padded(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width) < torch.tensor(lengths)[:, None]).long()


def test_every_token_lands_once_with_its_own_positions():
    lengths = torch.tensor([9, 6, 9, 2, 8])
    packing = plan_packing(lengths, padded_length=9)
    assert packing.rows == 3  # two samples per row, rounded up
    assert packing.length == 14  # the fullest row: 8 + 6 (longest first, each into the emptiest row)
    x = torch.arange(5 * 9).view(5, 9, 1).float() + 1  # every position a distinct non-zero value
    packed = pack(x, packing)
    real = right_padded(lengths.tolist(), 9).bool()
    assert sorted(packed[packed != 0].tolist()) == sorted(x[real].flatten().tolist())  # each token once, nothing else
    assert (packed != 0).sum() == lengths.sum()
    # Each sample's positions run 0, 1, ... wherever it landed.
    for sample, length in enumerate(lengths.tolist()):
        where = packing.target.view(5, 9)[sample, :length]
        torch.testing.assert_close(packing.position_ids.flatten()[where], torch.arange(length))
    unpacked = unpack(packed, packing, batch=5)
    torch.testing.assert_close(unpacked, x * real[..., None])


def test_only_right_padding_is_packed():
    assert right_padded_lengths(right_padded([3, 1, 4], 4)).tolist() == [3, 1, 4]
    assert right_padded_lengths(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left padding
    assert right_padded_lengths(torch.tensor([[1, 0, 1]])) is None  # a hole


def tiny_lm(name: str) -> FrozenLanguageModel:
    torch.manual_seed(0)
    return FrozenLanguageModel(LanguageModelConfig(config=DECODERS[name], precision="fp32"))


def hidden_and_gradient(lm: FrozenLanguageModel, embeds: torch.Tensor, mask: torch.Tensor, packed: bool):
    lm.packs_sequences = packed
    embeds = embeds.clone().requires_grad_(True)
    hidden = lm.last_hidden_state(embeds, mask)
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    (hidden * weights * mask[..., None]).sum().backward()
    return hidden.detach(), embeds.grad


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_packed_rows_give_the_padded_batch_results_where_transformers_allows_it(name):
    """Hidden states and input gradients equal at every real position, for each LM family stage 2 packs; the families
    it does not pack (OPT: positions from the attention mask) would get other results, which is why they are left out."""
    lm = tiny_lm(name)
    assert lm.packs_sequences == (name in PACKING_MODEL_TYPES)
    lengths = [9, 6, 9, 2, 8, 5, 7]
    mask = right_padded(lengths, 9)
    embeds = torch.randn(len(lengths), 9, lm.width)
    padded, padded_grad = hidden_and_gradient(lm, embeds, mask, packed=False)
    packed, packed_grad = hidden_and_gradient(lm, embeds, mask, packed=True)
    real = mask.bool()
    if name in PACKING_MODEL_TYPES:
        torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-5, rtol=1e-5)
        assert (packed[~real] == 0).all()
    else:
        assert not torch.allclose(packed[real], padded[real], atol=1e-3)


def test_a_left_padded_batch_runs_padded():
    lm = tiny_lm("llama")
    mask = right_padded([4, 2, 3], 4).flip(1)
    embeds = torch.randn(3, 4, lm.width)
    packed, _ = hidden_and_gradient(lm, embeds, mask, packed=True)
    padded, _ = hidden_and_gradient(lm, embeds, mask, packed=False)
    torch.testing.assert_close(packed, padded, atol=0, rtol=0)


def test_the_stage2_loss_and_gradients_are_the_padded_ones():
    """Through the whole stage-2 model (soft prompts, text, the head on labelled positions): the Q-Former and the
    projection get the gradients the padded batch gives."""
    config = preset("tiny")
    config.language_model = LanguageModelConfig(config=DECODERS["llama"], precision="fp32")
    torch.manual_seed(0)
    model = Stage2Model(config).eval()  # no dropout: the two runs see the same soft prompts
    pixels, ids = torch.randn(5, 3, 32, 32), torch.randint(3, VOCAB - 1, (5, 8))
    mask = right_padded([8, 3, 6, 8, 1], 8)
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, 0] = IGNORE

    def loss_and_grads(packed: bool):
        model.zero_grad()
        model.language_model.packs_sequences = packed
        loss = model(pixels, ids, mask, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    padded_loss, padded_grads = loss_and_grads(False)
    packed_loss, packed_grads = loss_and_grads(True)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-5)
    for packed, padded in zip(packed_grads, padded_grads):
        torch.testing.assert_close(packed, padded, atol=1e-6, rtol=1e-4)
