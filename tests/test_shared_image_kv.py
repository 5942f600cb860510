"""Image keys/values projected once per distinct image give the same losses, gradients and retrieval scores as
projecting them again for every pass (`tests/reference_stage1.py`, the formulation before the change)."""

import processes
import pytest
import torch

from qformer.losses import stage1_losses
from qformer.retrieval import RetrievalFeatures, itc_similarity, rerank
from qformer.stage1 import Stage1Model

from reference_stage1 import reference_rerank, reference_stage1_losses

DEC = 1


def batch(B=6, L=9, vocab=30523, same_image=True):
    pixels = torch.randn(B, 3, 32, 32)
    ids = torch.randint(1000, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -4:] = 0
    mask[3, -2:] = 0
    image_ids = torch.tensor([0, 1, 2, 2, 3, 4][:B]) if same_image else None  # two captions of one image
    return pixels, ids, mask, image_ids


def losses_and_grads(model, formulation, inputs, seed=0, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same hard negatives in both formulations
    losses = formulation(model, *inputs, DEC, **kwargs)
    losses.total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return torch.stack([losses.itc, losses.itm, losses.itg]).detach(), grads


@pytest.mark.parametrize("same_image", [True, False])
def test_losses_and_every_gradient_equal_the_reference(tiny_config, same_image):
    tiny_config.qformer_config.hidden_dropout_prob = 0.0
    tiny_config.qformer_config.attention_probs_dropout_prob = 0.0
    model = Stage1Model(tiny_config).train()
    inputs = batch(same_image=same_image)
    ours, our_grads = losses_and_grads(model, stage1_losses, inputs)
    reference, reference_grads = losses_and_grads(model, reference_stage1_losses, inputs)
    torch.testing.assert_close(ours, reference)
    assert our_grads.keys() == reference_grads.keys()
    assert {"ln_vision.weight", "qformer.layers.0.cross_attn.key.weight", "qformer.layers.0.cross_attn.value.weight"} <= our_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(our_grads[name], grad, msg=lambda m: f"{name}: {m}")


def test_itg_loss_ignores_padding_positions_entirely(tiny_config):
    """Only positions that predict a real token reach the vocabulary head: changing padded text changes nothing."""
    model = Stage1Model(tiny_config).eval()
    pixels, ids, mask, image_ids = batch()
    other = ids.clone()
    other[mask == 0] = 5
    torch.manual_seed(0)
    a = stage1_losses(model, pixels, ids, mask, image_ids, DEC).itg
    torch.manual_seed(0)
    b = stage1_losses(model, pixels, other, mask, image_ids, DEC).itg
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _pair_by_pair(model, features, sim, k):
    """Each row's top-k re-scored pair by pair, every pair with its own copy of its image."""
    I, T = sim.shape
    i2t = torch.full((I, T), -100.0)
    t2i = torch.full((T, I), -100.0)
    for i in range(I):
        texts = sim[i].topk(min(k, T)).indices
        logits = model.itm_logits(features.image_embeds[i].expand(len(texts), -1, -1), features.input_ids[texts], features.attention_mask[texts])
        i2t[i, texts] = logits[:, 1] + sim[i, texts]
    for t in range(T):
        images = sim[:, t].topk(min(k, I)).indices
        ids, mask = features.input_ids[t].expand(len(images), -1), features.attention_mask[t].expand(len(images), -1)
        t2i[t, images] = model.itm_logits(features.image_embeds[images], ids, mask)[:, 1] + sim[images, t]
    return i2t, t2i


@pytest.mark.parametrize("k, batch_size", [(3, 5), (100, 7)])
@torch.no_grad()
def test_rerank_equals_pair_by_pair_reference(tiny_config, k, batch_size):
    model = Stage1Model(tiny_config).eval()
    I, T, L = 5, 8, 7
    pixels = torch.randn(I, 3, 32, 32)
    image_embeds = model.encode_image(pixels)
    image_feats = model.image_feats(model.query_forward(image_embeds).last_hidden_state)
    ids = torch.randint(1000, 30523, (T, L))
    mask = torch.ones(T, L, dtype=torch.long)
    mask[::3, -2:] = 0
    text_feat = model.text_feat(ids, mask)
    features = RetrievalFeatures(image_embeds, image_feats, text_feat, ids, mask)
    sim = itc_similarity(image_feats, text_feat)
    i2t, t2i = rerank(model, features, sim, k, batch_size=batch_size)
    for expected_i2t, expected_t2i in (_pair_by_pair(model, features, sim, k), reference_rerank(model, features, sim, k, batch_size)):
        torch.testing.assert_close(i2t, expected_i2t)
        torch.testing.assert_close(t2i, expected_t2i)
    assert (i2t == -100).sum() == I * (T - min(k, T))  # exactly each row's top-k scored


def _ddp_worker(rank, world, init_file, config, inputs, out):
    import torch.distributed as dist

    from stages.distributed import all_gather_with_grad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Stage1Model(config).train()
    B = len(inputs[0]) // world
    local = [x[rank * B:(rank + 1) * B] for x in inputs[:3]] + [None]
    results = {}
    for name, formulation in (("ours", stage1_losses), ("reference", reference_stage1_losses)):
        results[name] = losses_and_grads(model, formulation, local, seed=rank, gather=all_gather_with_grad, rank=rank)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_processes_share_negative_images_with_the_reference_gradients(tiny_config, tmp_path):
    """Under DDP the hard-negative images come from other ranks: projected once each, their gradients still reach
    their owners as in the reference (which gathers and re-projects every copy)."""
    tiny_config.qformer_config.hidden_dropout_prob = 0.0
    tiny_config.qformer_config.attention_probs_dropout_prob = 0.0
    inputs = batch(B=8, same_image=False)[:3]
    out = tmp_path / "results"
    processes.spawn(_ddp_worker, (2, str(tmp_path / "init"), tiny_config, inputs, str(out)), nprocs=2)
    for rank in range(2):
        results = torch.load(f"{out}.{rank}")
        (ours, our_grads), (reference, reference_grads) = results["ours"], results["reference"]
        torch.testing.assert_close(ours, reference)
        for name, grad in reference_grads.items():
            torch.testing.assert_close(our_grads[name], grad, msg=lambda m: f"rank {rank} {name}: {m}")
