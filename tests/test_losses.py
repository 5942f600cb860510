"""ITC / ITM / ITG checked against direct transcriptions of the LAVIS formulas, and the hard-negative sampler."""

import math

import processes
import pytest
import torch
import torch.nn.functional as F

from qformer.losses import itc_loss, itg_loss, itg_targets, itm_loss, itm_pairs, sample_hard_negatives


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def lavis_itc(image_feats, text_feat, temp):
    """LAVIS Blip2Qformer.forward, ITC part, world size 1 (transcribed)."""
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1)  # [B, B, Q]
    sim_i2t, _ = sim_q2t.max(-1)
    sim_i2t = sim_i2t / temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(-2)
    sim_t2i, _ = sim_t2q.max(-1)
    sim_t2i = sim_t2i / temp
    targets = torch.arange(len(image_feats))
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1) + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2


def test_itc_two_by_two_by_hand():
    # Two images with one query each (Q=1) and orthogonal texts: cos = identity.
    image_feats = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    text_feat = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    temp = torch.tensor(0.5)
    loss, sim_i2t, _ = itc_loss(image_feats, text_feat, temp)
    assert torch.allclose(sim_i2t, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    p = torch.tensor(2.0).exp() / (torch.tensor(2.0).exp() + 1)  # softmax prob of the right pair
    expected = -(0.95 * p.log() + 0.05 * (1 - p).log())  # smoothing 0.1 over 2 classes
    assert torch.allclose(loss, expected)


def test_itc_matches_lavis_and_gradients():
    image_feats = unit(6, 4, 8).requires_grad_()
    text_feat = unit(6, 8).requires_grad_()
    temp = torch.tensor(0.07)
    ours, _, _ = itc_loss(image_feats, text_feat, temp)
    theirs = lavis_itc(image_feats, text_feat, temp)
    torch.testing.assert_close(ours, theirs)
    g_ours = torch.autograd.grad(ours, (image_feats, text_feat))
    g_theirs = torch.autograd.grad(theirs, (image_feats, text_feat))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)


def test_itc_same_image_pairs_are_positives():
    image_feats, text_feat, temp = unit(4, 2, 8), unit(4, 8), torch.tensor(0.1)
    image_ids = torch.tensor([7, 7, 3, 5])  # samples 0 and 1 show the same image
    loss, sim_i2t, sim_t2i = itc_loss(image_feats, text_feat, temp, image_ids)
    pos = (image_ids[:, None] == image_ids[None]).float()
    targets = 0.9 * pos / pos.sum(1, keepdim=True) + 0.1 / 4  # LAVIS's image_id branch
    expected = (-(F.log_softmax(sim_i2t, 1) * targets).sum(1).mean() - (F.log_softmax(sim_t2i, 1) * targets).sum(1).mean()) / 2
    torch.testing.assert_close(loss, expected)
    unique, _, _ = itc_loss(image_feats, text_feat, temp, torch.arange(4))
    assert not torch.allclose(loss, unique)


def test_itg_loss_shifts_and_ignores_padding():
    V = 5
    logits = torch.randn(2, 4, V)
    ids = torch.tensor([[1, 2, 3, 4], [1, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    terms = []
    for b, t in [(0, 0), (0, 1), (0, 2), (1, 0)]:  # predict ids[b, t + 1] from position t
        log_p = F.log_softmax(logits[b, t], -1)
        terms.append(-(0.9 * log_p[ids[b, t + 1]] + 0.1 * log_p.mean()))
    positions, targets = itg_targets(ids, mask)
    assert positions.tolist() == [[True, True, True, False], [True, False, False, False]]
    torch.testing.assert_close(itg_loss(logits[positions], targets), torch.stack(terms).mean())


def test_itm_loss_by_hand():
    """Binary match / no-match cross-entropy, worked out by hand: -mean(log softmax(logits)[label])."""
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0], [3.0, 0.0]], dtype=torch.bfloat16)  # the ITM head may run in bf16
    labels = torch.tensor([1, 0, 0])
    by_hand = -(math.log(math.exp(2) / (1 + math.exp(2))) + math.log(0.5) + math.log(math.exp(3) / (math.exp(3) + 1))) / 3
    loss = itm_loss(logits, labels)
    assert loss.dtype == torch.float32  # computed in fp32 whatever the head's precision
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize(
    "sim",
    [
        torch.randn(8, 8),
        torch.full((8, 8), 3.0),  # all equal
        torch.randn(8, 8) * 1e4,  # extreme
        torch.tensor([[float("inf"), float("nan"), -float("inf"), 1.0]] * 4),
    ],
)
def test_hard_negatives_never_positive_never_nan(sim):
    B = sim.shape[0]
    positive = torch.eye(B, sim.shape[1], dtype=torch.bool)
    for _ in range(50):
        index, valid = sample_hard_negatives(sim, positive)
        assert valid.all()
        assert not positive[torch.arange(B), index].any()


def test_hard_negatives_with_repeated_image_ids_and_batch_of_one():
    ids = torch.tensor([0, 0, 1, 1, 2])
    positive = ids[:, None] == ids[None]
    for _ in range(50):
        index, valid = sample_hard_negatives(torch.randn(5, 5), positive)
        assert valid.all() and (ids[index] != ids).all()
    index, valid = sample_hard_negatives(torch.randn(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert not valid.any()
    _, valid = sample_hard_negatives(torch.randn(3, 3), torch.ones(3, 3, dtype=torch.bool))  # one image only
    assert not valid.any()


def test_hard_negatives_follow_the_similarity():
    sim = torch.tensor([[0.0, 10.0, -10.0]])
    positive = torch.tensor([[True, False, False]])
    picks = torch.stack([sample_hard_negatives(sim, positive)[0] for _ in range(200)])
    assert (picks == 1).float().mean() > 0.95


def test_itm_pairs_layout():
    B, L = 3, 4
    ids = torch.arange(B)[:, None].expand(B, L) + 10
    mask = torch.ones(B, L, dtype=torch.long)
    image_of, texts, masks, labels = itm_pairs(torch.randn(B, B), torch.randn(B, B), ids, mask)
    assert labels.tolist() == [1] * B + [0] * 2 * B
    text_of = texts[:, 0] - 10
    assert (image_of[:B] == text_of[:B]).all()  # positives
    assert (image_of[B:] != text_of[B:]).all()  # negatives never match
    one = itm_pairs(torch.randn(1, 1), torch.randn(1, 1), ids[:1], mask[:1])
    assert one[3].tolist() == [1]  # batch of one: no negative exists, no NaN, only the positive pair


# --- two processes (gloo) give the gradients of one process on the concatenated batch --------------
def _features(W_img, W_txt, x, y):
    image_feats = F.normalize(torch.einsum("bqi,oi->bqo", x, W_img), dim=-1)
    text_feat = F.normalize(y @ W_txt.T, dim=-1)
    return image_feats, text_feat


def _worker(rank, world, init_file, x, y, W_img, W_txt, out):
    import torch.distributed as dist

    from stages.distributed import all_gather_with_grad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    W_img, W_txt = W_img.clone().requires_grad_(), W_txt.clone().requires_grad_()
    B = len(x) // world
    local = slice(rank * B, (rank + 1) * B)
    image_feats, text_feat = _features(W_img, W_txt, x[local], y[local])
    loss, _, _ = itc_loss(image_feats, text_feat, torch.tensor(0.07), gather=all_gather_with_grad, rank=rank)
    loss.backward()
    for grad in (W_img.grad, W_txt.grad):  # what DDP does
        dist.all_reduce(grad)
        grad /= world
    if rank == 0:
        torch.save({"img": W_img.grad, "txt": W_txt.grad}, out)
    dist.destroy_process_group()


def test_two_process_itc_gradients_equal_one_process(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 6), torch.randn(8, 6)
    W_img, W_txt = torch.randn(5, 6), torch.randn(5, 6)
    out = tmp_path / "grads.pt"
    processes.spawn(_worker, (2, str(tmp_path / "init"), x, y, W_img, W_txt, str(out)), nprocs=2)
    out = torch.load(out)

    W_i, W_t = W_img.clone().requires_grad_(), W_txt.clone().requires_grad_()
    loss, _, _ = itc_loss(*_features(W_i, W_t, x, y), torch.tensor(0.07))
    loss.backward()
    torch.testing.assert_close(out["img"], W_i.grad)
    torch.testing.assert_close(out["txt"], W_t.grad)
