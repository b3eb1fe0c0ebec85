"""The two terms of the D3 objective (`hf_d3.distill.losses`): the unbiased MMD of decoded and real images in an
expert's feature space, and trajectory matching through an unrolled inner loop."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import make_net, make_store_and_decoder
from torch import nn

from hf_d3 import D3Decoder, GaussianLatentStore
from hf_d3.data import RealImages
from hf_d3.distill import FlatModel, class_mmd_parts, mmd2_unbiased, trajectory_matching_loss
from hf_d3.distill.losses import real_per_class
from hf_d3.experts import flat_parameters

# ----------------------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------------------


def test_mmd_matches_a_direct_double_loop():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y += 0.7
    bandwidths = [1.0, 2.0, 4.0]

    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s)) for s in bandwidths)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    assert mmd2_unbiased(x, y, bandwidths).item() == pytest.approx(xx + yy - 2 * xy, rel=1e-9, abs=1e-12)


def test_mmd_of_samples_of_one_distribution_is_zero_in_expectation():
    gen = torch.Generator().manual_seed(0)
    bandwidths = [1.0, 2.0, 4.0, 8.0, 16.0]
    big = mmd2_unbiased(torch.randn(1000, 4, generator=gen), torch.randn(1000, 4, generator=gen), bandwidths)
    assert abs(big.item()) < 1e-2
    shifted = mmd2_unbiased(torch.randn(1000, 4, generator=gen), torch.randn(1000, 4, generator=gen) + 1, bandwidths)
    assert shifted.item() > 0.1
    # unbiased: small samples average to 0 (a biased estimator would average clearly above 0)
    values = torch.stack([mmd2_unbiased(torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen),
                                        bandwidths) for _ in range(2000)])
    assert abs(values.mean().item()) < 3 * values.std().item() / math.sqrt(len(values))


def test_real_images_for_the_mmd_are_drawn_from_each_class_in_turn():
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0])  # shuffled, classes of unequal size
    data = RealImages(torch.arange(8.0)[:, None], labels, [10, 11, 12])
    assert [x.tolist() for x in data.indices_by_class] == [[1, 3, 7], [2, 6], [0, 4, 5]]
    drawn = real_per_class(data, 5, torch.Generator().manual_seed(0))
    assert labels[drawn].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert len(set(drawn.tolist())) > 3  # random picks, not one image per class
    assert torch.equal(drawn, real_per_class(data, 5, torch.Generator().manual_seed(0)))


def test_mmd_in_parts_sums_to_the_mmd_in_one_part(data, trajectory, monkeypatch):
    """Parts of whole classes (here one class each), each backpropagated alone, give the loss and gradients of one
    batch of all classes, from the same draws; the decoder in eval mode, so that batch statistics do not depend on
    the parts."""
    import hf_d3.distill.losses as losses

    torch.manual_seed(0)
    store = GaussianLatentStore([0, 1, 2, 3], num_classes=4, latents_per_class=3, latent_dim=8)
    decoder = D3Decoder(latent_dim=8, resolution=16, out_channels=1, channels=[8, 8, 8]).eval()
    net, steps = trajectory
    embed = partial(FlatModel(net).features, steps[-1])
    results = []
    for part_images in (512, 2):  # 2 images: a part per class
        monkeypatch.setattr(losses, "MMD_PART_IMAGES", part_images)
        store.mean.grad = None
        count, total = 0, 0.0
        # each part backpropagated alone, as the loop does: parts share no graph
        for part in class_mmd_parts(store, decoder, data, embed, 2, [1.0, 4.0], torch.Generator().manual_seed(3)):
            part.backward()
            count, total = count + 1, total + part.item()
        results.append((count, total, store.mean.grad.clone()))
    (one, whole, grad), (four, summed, grad_in_parts) = results
    assert (one, four) == (1, 4)
    assert summed == pytest.approx(whole, rel=1e-5) and torch.allclose(grad_in_parts, grad, rtol=1e-4, atol=1e-7)


def test_mmd_step_reaches_every_component_when_there_are_more_than_samples(data, trajectory):
    """6 components per class, 2 MMD samples per class per step: the steps together reach all 6, two at a time."""
    torch.manual_seed(0)
    store = GaussianLatentStore([0, 1, 2, 3], num_classes=4, latents_per_class=6, latent_dim=8)
    decoder = D3Decoder(latent_dim=8, resolution=16, out_channels=1, channels=[8, 8, 8])
    net, steps = trajectory
    embed = partial(FlatModel(net).features, steps[-1])
    gen = torch.Generator().manual_seed(0)
    reached = torch.zeros(store.num_components, dtype=torch.bool)
    for _ in range(20):
        store.mean.grad = None
        sum(class_mmd_parts(store, decoder, data, embed, 2, [1.0, 4.0], gen)).backward()
        touched = store.mean.grad.abs().sum(1) > 0
        assert touched.view(4, 6).sum(1).tolist() == [2, 2, 2, 2]
        reached |= touched
    assert reached.all()


# ----------------------------------------------------------------------------------------------------------
# Trajectory matching
# ----------------------------------------------------------------------------------------------------------


def decoded_batches(store, decoder, steps: int, generator: torch.Generator):
    local_label = torch.arange(store.num_components) // store.config.latents_per_class
    batches = []
    for _ in range(steps):
        components = torch.randperm(store.num_components, generator=generator)
        latents, _ = store.sample(components, generator=generator)
        batches.append((decoder(latents), local_label[components]))
    return batches


def test_mtt_loss_is_one_when_the_synthetic_lr_is_zero(trajectory):
    net, steps = trajectory
    store, decoder = make_store_and_decoder()
    batches = decoded_batches(store, decoder, 3, torch.Generator().manual_seed(0))
    loss = trajectory_matching_loss(FlatModel(net), steps[0], steps[2], batches, torch.tensor(0.0))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    moved = trajectory_matching_loss(FlatModel(net), steps[0], steps[2], batches, torch.tensor(0.05))
    assert moved.item() != pytest.approx(1.0, abs=1e-6)


def test_mtt_loss_matches_one_explicit_sgd_step(trajectory):
    net, steps = trajectory
    store, decoder = make_store_and_decoder()
    ((images, labels),) = decoded_batches(store, decoder, 1, torch.Generator().manual_seed(1))
    images = images.detach()
    start, target, lr = steps[0], steps[2], 0.05

    model = make_net()  # an ordinary network holding the start parameters, trained the ordinary way
    nn.utils.vector_to_parameters(start.clone(), model.parameters())
    loss = nn.functional.cross_entropy(model(images).logits, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    after = start - lr * torch.cat([g.flatten() for g in grads])
    expected = (after - target).pow(2).sum() / (start - target).pow(2).sum()

    got = trajectory_matching_loss(FlatModel(net), start, target, [(images, labels)], torch.tensor(lr))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mtt_gradients_reach_latents_decoder_and_lr(trajectory):
    net, steps = trajectory
    net.zero_grad(set_to_none=True)
    store, decoder = make_store_and_decoder()
    syn_lr = torch.tensor(0.01, requires_grad=True)
    batches = decoded_batches(store, decoder, 3, torch.Generator().manual_seed(0))
    trajectory_matching_loss(FlatModel(net), steps[0], steps[1], batches, syn_lr).backward()
    for name, tensor in (("mean", store.mean), ("logvar", store.logvar), ("syn_lr", syn_lr)):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name
    for name, param in decoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    final_conv = decoder.generators[0].body[-2]
    assert final_conv.weight.grad.abs().sum() > 0 and decoder.generators[0].project.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())  # the expert itself is never trained


def test_flat_model_is_the_network(trajectory, data):
    net, _ = trajectory
    flat = FlatModel(net)
    x = data.images[:5]
    out = net(x, output_hidden_states=True)
    assert torch.allclose(flat.logits(flat_parameters(net), x), out.logits, atol=1e-6)
    assert torch.allclose(flat.features(flat_parameters(net), x), out.hidden_states[-1], atol=1e-6)
