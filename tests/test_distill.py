"""The D3 objective and training loop: MMD, trajectory matching, expert trajectories, relabelling, evaluation, and
a whole (tiny) `run_distillation` on a real local dataset."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import PIL.Image
import pytest
import torch
from conftest import TINY_RUN, stage_folders, tiny_plan
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForImageClassification

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore, build_classifier
from hf_d3.config import D3Config
from hf_d3.data import RealImages, load_image_dataset, load_images
from hf_d3.distill import (
    FlatModel,
    class_mmd_loss,
    distill_subtask,
    mmd2_unbiased,
    trajectory_matching_loss,
    warm_start,
)
from hf_d3.distill.losses import real_per_class
from hf_d3.distill.subtask import distilled_subtask
from hf_d3.evaluation import (
    accuracy,
    epoch_batches,
    evaluate_sampler,
    pipeline_sampler,
    soft_cross_entropy,
    train_student,
)
from hf_d3.experts import flat_parameters, load_trajectory, save_trajectory, train_classifier
from hf_d3.federated import train_expert_trajectories
from hf_d3.run import run_distillation
from hf_d3.run_plan import make_plan
from hf_d3.teacher import hard_label_weight_for, relabel, teacher_labels

CONFIG = D3Config.from_dict(TINY_RUN)  # 16x16 grayscale, 2 latents of 8 dims per class, decoder [8, 8, 8]


def make_net(num_labels: int = 4) -> nn.Module:
    return build_classifier("convnet", num_channels=1, image_size=16, num_labels=num_labels, width=8, depth=2)


def make_store_and_decoder(seed: int = 0, class_ids=(0, 1, 2, 3)) -> tuple[GaussianLatentStore, D3Decoder]:
    torch.manual_seed(seed)
    store = GaussianLatentStore(list(class_ids), num_classes=4, latents_per_class=2, latent_dim=8)
    decoder = D3Decoder(latent_dim=8, resolution=16, out_channels=1, channels=[8, 8, 8])
    return store, decoder


@pytest.fixture(scope="module")
def data(fmnist4_tensors) -> RealImages:
    """Real Fashion-MNIST images of the 4 classes, one subtask (local labels = global ids here)."""
    return RealImages(fmnist4_tensors.images, fmnist4_tensors.labels, [0, 1, 2, 3])


@pytest.fixture(scope="module")
def trajectory(data) -> tuple[nn.Module, torch.Tensor]:
    """One expert trained 2 epochs on the real data: (network, trajectory [3, num_params])."""
    torch.manual_seed(0)
    net = make_net()
    steps = train_classifier(net, data.images, data.labels, epochs=2, lr=0.01, batch_size=32,
                             generator=torch.Generator().manual_seed(0), augment=False)
    return net, torch.stack(steps)


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
        class_mmd_loss(store, decoder, data, embed, 2, [1.0, 4.0], gen).backward()
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


# ----------------------------------------------------------------------------------------------------------
# Expert trajectories
# ----------------------------------------------------------------------------------------------------------


def test_train_classifier_records_every_epoch(trajectory, data):
    net, steps = trajectory
    assert steps.shape == (3, sum(p.numel() for p in net.parameters()))
    assert torch.equal(steps[-1], flat_parameters(net))  # the last entry is the trained network
    assert (steps[1] - steps[0]).norm() > 0 and (steps[2] - steps[1]).norm() > 0
    torch.manual_seed(0)
    again = train_classifier(make_net(), data.images, data.labels, 2, 0.01, 32, torch.Generator().manual_seed(0),
                             augment=False)
    assert torch.equal(torch.stack(again), steps)  # seeded: the same trajectory


def test_trajectory_round_trip_through_safetensors(trajectory, tmp_path):
    net, steps = trajectory
    folder = tmp_path / "expert"
    save_trajectory(folder, net.config.to_dict(), list(steps))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "trajectory.safetensors"]  # no .partial
    with safe_open(str(folder / "trajectory.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["epoch_0", "epoch_1", "epoch_2"]
        assert f.metadata() == {"num_epochs": "2"}
    model, loaded = load_trajectory(folder)
    assert torch.equal(loaded, steps)
    assert type(model) is type(net)
    assert (model.config.width, model.config.depth, model.config.num_labels) == (8, 2, 4)
    assert sum(p.numel() for p in model.parameters()) == loaded.shape[1]


def test_expert_training_resumes_from_what_is_on_disk(fmnist4_folder, tiny_run, tmp_path):
    train = load_image_dataset(str(fmnist4_folder), "train")

    def train_experts(num_experts: int, **settings) -> list[Path]:
        config = tiny_run(num_experts=num_experts, num_subtasks=2, output_dir=str(tmp_path), **settings)
        summary = train_expert_trajectories(config, tiny_plan(config), train, torch.device("cpu"))
        assert len(summary) == 1 and summary[0].rank == 0
        return stage_folders(tmp_path, "experts"), summary[0].experts

    paths, trained = train_experts(2)
    assert [p.name.rsplit("-", 1)[0] for p in paths] == [f"subtask{k}-expert{i}" for k in (0, 1) for i in (0, 1)]
    assert trained == [(0, 0), (1, 0), (0, 1), (1, 1)]  # expert index first
    mtimes = {p: (p / "trajectory.safetensors").stat().st_mtime_ns for p in paths}
    first = load_trajectory(paths[0])[1]
    model = load_trajectory(paths[2])[0]
    assert model.config.num_labels == 2  # an expert of subtask 1 knows only its 2 classes

    paths, trained = train_experts(3)
    assert trained == [(0, 2), (1, 2)]  # only what is missing
    assert mtimes == {p: (p / "trajectory.safetensors").stat().st_mtime_ns for p in mtimes}  # not retrained
    third = next(p for p in paths if p.name.startswith("subtask0-expert2-"))
    assert not torch.equal(load_trajectory(third)[1], first)
    assert torch.equal(load_trajectory(paths[0])[1], first)

    _, trained = train_experts(2, expert_lr=0.02)  # other settings: new experts, the others kept beside them
    assert trained == [(0, 0), (1, 0), (0, 1), (1, 1)] and len(stage_folders(tmp_path, "experts")) == 10


# ----------------------------------------------------------------------------------------------------------
# distill_subtask
# ----------------------------------------------------------------------------------------------------------


def distill(data, trajectory, seed=0, checkpoint_dir=None, **overrides):
    store, decoder = make_store_and_decoder(seed)
    config = D3Config.from_dict({**TINY_RUN, **overrides}).distillation
    stats = distill_subtask(store, decoder, data, [trajectory], config, torch.Generator().manual_seed(seed),
                            checkpoint_dir=checkpoint_dir)
    return store, decoder, stats


def test_seeded_distillation_is_deterministic(data, trajectory):
    a_store, a_decoder, a_stats = distill(data, trajectory, iterations=3)
    b_store, b_decoder, b_stats = distill(data, trajectory, iterations=3)
    for (name, a), (_, b) in zip([*a_store.state_dict().items(), *a_decoder.state_dict().items()],
                                 [*b_store.state_dict().items(), *b_decoder.state_dict().items()], strict=True):
        assert torch.equal(a, b), name
    assert a_stats.iterations_wall_time_s > 0 and b_stats.iterations_wall_time_s > 0
    assert replace(a_stats, iterations_wall_time_s=0) == replace(b_stats, iterations_wall_time_s=0)
    assert a_stats.iterations_run == 3
    assert len(a_stats.loss_history["mtt"]) == 3 and len(a_stats.loss_history["mmd"]) == 3
    assert a_stats.syn_lr != CONFIG.distillation.syn_lr_init  # the learnable lr was stepped

    init_store, _ = make_store_and_decoder(0)
    assert not torch.equal(a_store.mean, init_store.mean)  # the latents were trained
    c_store, _, _ = distill(data, trajectory, seed=1, iterations=3)
    assert not torch.equal(c_store.mean, a_store.mean)


def test_a_time_limit_stops_the_iterations(data, trajectory):
    _, _, stats = distill(data, trajectory, iterations=5, max_distill_time_s=0.0)
    assert stats.iterations_run == 0 and stats.loss_history == {"mtt": [], "mmd": []}
    _, _, stats = distill(data, trajectory, iterations=2, max_distill_time_s=600.0)
    assert stats.iterations_run == 2


def test_each_term_can_be_switched_off(data, trajectory):
    _, _, only_mmd = distill(data, trajectory, mtt_weight=0.0)
    assert only_mmd.loss_history["mtt"] == [] and len(only_mmd.loss_history["mmd"]) == 2
    assert only_mmd.syn_lr == pytest.approx(CONFIG.distillation.syn_lr_init)  # never stepped
    _, _, only_mtt = distill(data, trajectory, mmd_weight=0.0)
    assert only_mtt.loss_history["mmd"] == [] and len(only_mtt.loss_history["mtt"]) == 2


def test_checkpoints_are_written_every_n_iterations(data, trajectory, tmp_path):
    store, decoder, _ = distill(data, trajectory, checkpoint_dir=tmp_path, iterations=2, checkpoint_every=1)
    saved = GaussianLatentStore.from_pretrained(tmp_path / "latent_store")
    assert torch.equal(saved.mean, store.mean)  # the last checkpoint is the final latents
    assert D3Decoder.from_pretrained(tmp_path / "decoder").config.latent_dim == 8


def test_an_interrupted_distillation_resumes_exactly(data, trajectory, tmp_path):
    whole_store, whole_decoder, whole = distill(data, trajectory, iterations=4, checkpoint_every=2,
                                                checkpoint_dir=tmp_path / "whole")
    # attempts of 0 -> 1 and 1 -> 2 iterations (each saves its end state), then 2 -> 4 in a fresh process
    distill(data, trajectory, iterations=1, checkpoint_dir=tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "progress.json").read_text())["iterations_run"] == 1
    distill(data, trajectory, iterations=2, checkpoint_dir=tmp_path / "resumed")
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert progress["iterations_run"] == 2

    # other initial latents and decoder, overwritten by the checkpoint
    store, decoder, resumed = distill(data, trajectory, seed=1, iterations=4, checkpoint_every=1,
                                      checkpoint_dir=tmp_path / "resumed")
    for (name, a), (_, b) in zip([*whole_store.state_dict().items(), *whole_decoder.state_dict().items()],
                                 [*store.state_dict().items(), *decoder.state_dict().items()], strict=True):
        assert torch.equal(a, b), name
    assert resumed.iterations_wall_time_s >= progress["iterations_wall_time_s"]  # both attempts count
    assert replace(resumed, iterations_wall_time_s=0) == replace(whole, iterations_wall_time_s=0)
    assert resumed.iterations_run == 4


def test_a_resumed_time_limit_counts_the_earlier_iterations(data, trajectory, tmp_path):
    distill(data, trajectory, iterations=2, checkpoint_every=1, checkpoint_dir=tmp_path)
    spent = json.loads((tmp_path / "progress.json").read_text())["iterations_wall_time_s"]
    _, _, stats = distill(data, trajectory, iterations=10, max_distill_time_s=spent, checkpoint_dir=tmp_path)
    assert stats.iterations_run == 2


def test_a_checkpoint_of_other_sizes_is_refused(data, trajectory, tmp_path):
    distill(data, trajectory, iterations=1, checkpoint_dir=tmp_path)
    store = GaussianLatentStore([0, 1, 2, 3], num_classes=4, latents_per_class=3, latent_dim=8)
    decoder = D3Decoder(latent_dim=8, resolution=16, out_channels=1, channels=[8, 8, 8])
    with pytest.raises(ValueError, match=r"another GaussianLatentStore \(\['latents_per_class'\] differ"):
        distill_subtask(store, decoder, data, [trajectory], CONFIG.distillation, torch.Generator(),
                        checkpoint_dir=tmp_path)


@pytest.mark.parametrize("weights, term", [({}, "trajectory matching"), ({"mtt_weight": 0.0}, "MMD")])
def test_nan_loss_stops_with_a_checkpoint(data, trajectory, tmp_path, weights, term):
    store, decoder = make_store_and_decoder()
    with torch.no_grad():
        store.mean[3, 2] = float("nan")
    config = D3Config.from_dict({**TINY_RUN, **weights}).distillation
    with pytest.raises(FloatingPointError) as error:
        distill_subtask(store, decoder, data, [trajectory], config, torch.Generator().manual_seed(0),
                        checkpoint_dir=tmp_path / "checkpoint")
    message = str(error.value)
    assert f"the {term} loss became nan at iteration 0" in message
    assert str(tmp_path / "checkpoint") in message and "Lower the learning rates" in message
    assert json.loads((tmp_path / "checkpoint" / "progress.json").read_text())["iterations_run"] == 0
    saved = GaussianLatentStore.from_pretrained(tmp_path / "checkpoint" / "latent_store")
    assert torch.isnan(saved.mean[3, 2]) and torch.equal(saved.mean.nan_to_num(0.0), store.mean.nan_to_num(0.0))
    assert (tmp_path / "checkpoint" / "decoder" / "config.json").is_file()


def test_diverging_learning_rate_stops(data, trajectory, tmp_path):
    store, decoder = make_store_and_decoder()
    config = D3Config.from_dict({**TINY_RUN, "syn_lr_init": 1e30, "iterations": 3}).distillation
    with pytest.raises(FloatingPointError, match="loss became (nan|inf)"):
        distill_subtask(store, decoder, data, [trajectory], config, torch.Generator().manual_seed(0),
                        checkpoint_dir=tmp_path)
    assert (tmp_path / "latent_store" / "config.json").is_file()


def test_warm_start_fits_real_images(data):
    store, decoder = make_store_and_decoder()
    targets = torch.cat([data.images[data.labels == c][:2] for c in range(4)])
    with torch.no_grad():
        before = nn.functional.mse_loss(decoder.eval()(store.mean), targets).item()
    error = warm_start(store, decoder, data, steps=30, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(store.logvar, torch.full_like(store.logvar, math.log(0.01)))
    with torch.no_grad():
        after = nn.functional.mse_loss(decoder.train()(store.mean), targets).item()
    assert after < 0.5 * before
    assert error < 0.5 * before  # the reported reconstruction error is that of the fitted decoder

    # several real images per component: each component becomes the Gaussian of its images' latents
    store, decoder = make_store_and_decoder()
    warm_start(store, decoder, data, steps=30, lr=1e-2, generator=torch.Generator().manual_seed(0),
               images_per_component=5, prior_weight=0.0)
    assert store.logvar.exp().min() >= 0.01 - 1e-6 and store.logvar.exp().max() > 0.011  # a spread was fitted
    with pytest.raises(ValueError, match=r"needs 200 real images per class; .* \(2 latents x 100 images"):
        warm_start(store, decoder, data, steps=1, lr=1e-2, generator=torch.Generator().manual_seed(0),
                   images_per_component=100)

    # no steps, no error to report: None, which json writes as null (NaN is not JSON)
    store, decoder = make_store_and_decoder()
    assert warm_start(store, decoder, data, steps=0, lr=1e-2, generator=torch.Generator().manual_seed(0)) is None

    short = RealImages(data.images[:3], torch.tensor([0, 0, 1]), [0, 1])
    store, decoder = make_store_and_decoder(class_ids=(0, 1))
    with pytest.raises(ValueError, match=r"init=real needs 2 real images per class; some class of \[0, 1\]"):
        warm_start(store, decoder, short, steps=1, lr=1e-2, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------
# Relabelling and evaluation
# ----------------------------------------------------------------------------------------------------------


def test_relabel_gives_the_teachers_softmax():
    store, decoder = make_store_and_decoder()
    torch.manual_seed(1)
    teacher = make_net().eval()
    relabel(store, decoder, teacher, temperature=2.0)
    with torch.no_grad():
        expected = (teacher(decoder.eval()(store.mean)).logits / 2.0).softmax(1)
    assert torch.allclose(store.soft_labels, expected, atol=1e-6)
    assert torch.allclose(store.soft_labels.sum(1), torch.ones(8))
    sharp = store.soft_labels.clone()
    relabel(store, decoder, teacher, temperature=20.0)
    entropy = lambda p: -(p * p.log()).sum(1)  # noqa: E731
    assert (entropy(store.soft_labels) > entropy(sharp)).all()  # a higher temperature gives softer labels


def test_relabel_mixes_the_class_in_at_hard_label_weight():
    store, decoder = make_store_and_decoder()
    torch.manual_seed(1)
    teacher = make_net().eval()
    relabel(store, decoder, teacher, temperature=2.0)
    soft = store.soft_labels.clone()
    one_hot = torch.nn.functional.one_hot(store.component_class, 4).float()
    relabel(store, decoder, teacher, temperature=2.0, hard_label_weight=0.25)
    assert torch.allclose(store.soft_labels, 0.25 * one_hot + 0.75 * soft, atol=1e-6)
    relabel(store, decoder, teacher, temperature=2.0, hard_label_weight=1.0)
    assert torch.equal(store.soft_labels, one_hot)  # the class id alone: the teacher's view drops out
    with pytest.raises(ValueError, match="hard_label_weight=0.5 needs the images' classes"):
        teacher_labels(teacher, decoder(store.mean), hard_label_weight=0.5)


def test_the_hard_label_weight_grows_with_the_storage_and_a_given_one_wins():
    weights = [hard_label_weight_for(b) for b in (0.5, 1, 2, 5, 10, 20, 50, 100)]
    assert weights[:2] == [0.0, 0.0] and weights[-2:] == [1.0, 1.0]  # the teacher's alone, the class's alone
    assert weights == sorted(weights) and 0 < weights[2] < weights[5] < 1
    budgeted = tiny_plan(D3Config.from_dict({**TINY_RUN, "storage_budget_ipc": 10}))
    assert budgeted.hard_label_weight == hard_label_weight_for(10)
    unbudgeted = tiny_plan(D3Config.from_dict(TINY_RUN))  # no budget: the storage its sizes take decides
    assert unbudgeted.hard_label_weight == hard_label_weight_for(unbudgeted.storage.ipc_equivalent)
    given = tiny_plan(D3Config.from_dict({**TINY_RUN, "hard_label_weight": 0.0, "storage_budget_ipc": 50}))
    assert given.hard_label_weight == 0.0


def test_relabel_refuses_a_teacher_of_another_label_space():
    store, decoder = make_store_and_decoder()
    before = store.soft_labels.clone()
    with pytest.raises(ValueError, match="the teacher predicts 10 classes but the dataset has 4"):
        relabel(store, decoder, make_net(num_labels=10), 1.0)
    assert torch.equal(store.soft_labels, before)


def test_soft_cross_entropy_of_one_hot_labels_is_cross_entropy():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 3, 1, 1, 2, 0])
    assert soft_cross_entropy(logits, torch.eye(4)[labels]).item() == pytest.approx(
        nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize("num_images, sizes", [(2320, [232] * 10), (400, [200, 200]), (80, [80]), (257, [129, 128]),
                                               (512, [256, 256])])
def test_epoch_batches_are_equal_and_cover_the_epoch_once(num_images, sizes):
    batches = epoch_batches(num_images, 256, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == sizes
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(num_images))


def test_pipeline_sampler_and_evaluation(data):
    store, decoder = make_store_and_decoder()
    pipe = D3Pipeline(latent_store=store, decoder=decoder)
    images, targets = pipeline_sampler(pipe)(torch.Generator().manual_seed(0))
    assert images.shape == (16, 1, 16, 16) and targets.shape == (16, 4)  # 8 means + 8 samples, soft labels
    assert torch.equal(targets, store.soft_labels.repeat(2, 1))

    def real_sampler(generator):  # the real data as a sampler: a student must learn something from it
        return data.images, torch.eye(4)[data.labels]

    kwargs = {"architecture": "convnet", "steps": 12, "batch_size": 32, "lr": 0.01, "augment": False, "seeds": 2,
              "width": 8, "depth": 2}
    result = evaluate_sampler(real_sampler, data.images, data.labels, 4, **kwargs)
    assert result.num_eval_runs == 2 and len(result.accuracies) == 2 and result.student_steps == 12
    assert all(0 <= a <= 1 for a in result.accuracies)
    assert result == evaluate_sampler(real_sampler, data.images, data.labels, 4, **kwargs)  # seeded
    # a student depends on its seed alone: seed 1 on its own is the second student of the pair
    later = evaluate_sampler(real_sampler, data.images, data.labels, 4, **{**kwargs, "seeds": 1}, first_seed=1)
    assert later.accuracies == result.accuracies[1:]
    assert result.accuracy_mean > 0.4  # well above the 0.25 of chance after 12 steps on its own training data

    student = train_student(make_net(), real_sampler, steps=3, batch_size=32, augment=True)
    assert student.training


# ----------------------------------------------------------------------------------------------------------
# run_distillation, end to end (one process)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher10")
    make_net(num_labels=10).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(fmnist4_folder, bad_teacher, tmp_path_factory):
    """A run that fails at relabelling (its teacher knows 10 classes, the data 4), then the same output_dir rerun
    without that teacher. Returns (output_dir, the first error, files after the failure, mtimes, the rerun).

    A run checks its teacher before any work (tests/test_bad_input.py): that check is skipped here, so the teacher
    fails where a problem only its weights show would, at relabelling, after the subtasks are finished."""
    output_dir = tmp_path_factory.mktemp("run")
    settings = {"dataset": str(fmnist4_folder), "output_dir": str(output_dir), **TINY_RUN}
    with pytest.raises(ValueError) as error, pytest.MonkeyPatch.context() as patch:
        patch.setattr("hf_d3.preflight.check_teacher", lambda *args: None)
        run_distillation(D3Config.from_dict({**settings, "teacher": str(bad_teacher)}))
    after_failure = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*"))
    (subtask,), (expert,) = stage_folders(output_dir, "subtasks"), stage_folders(output_dir, "experts")
    mtimes = {p: p.stat().st_mtime_ns for p in (subtask / "stage.json", expert / "trajectory.safetensors")}
    result = run_distillation(D3Config.from_dict(settings))
    return output_dir, error.value, after_failure, mtimes, result


def test_a_failed_run_leaves_no_results(runs):
    output_dir, error, after_failure, _, _ = runs
    assert "the teacher predicts 10 classes but the dataset has 4" in str(error)
    for name in ("metrics.json", "samples.png", "config.json"):
        assert name not in after_failure, name
    assert not any(p == "pipeline" or p.startswith("pipeline") for p in after_failure)
    (subtask,) = stage_folders(output_dir, "subtasks")
    assert f"{subtask.relative_to(output_dir)}/stage.json" in after_failure  # the finished subtask is kept


def test_the_rerun_reuses_the_finished_subtask(runs):
    _, _, _, mtimes, _ = runs
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_end_to_end_run(runs, fmnist4_folder):
    output_dir, _, _, _, result = runs
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 1 and metrics["num_eval_runs"] == 1 and metrics["student_steps"] == 4
    assert 0 <= metrics["accuracy_mean"] <= 1
    (teacher_folder,) = stage_folders(output_dir, "teacher")
    teacher = AutoModelForImageClassification.from_pretrained(teacher_folder)
    test, n = load_images(load_image_dataset(str(fmnist4_folder), "test"), 16, 1), TINY_RUN["max_test_examples"]
    assert metrics["teacher_accuracy"] == accuracy(teacher, test.images[:n], test.labels[:n])
    assert metrics["storage"] == metrics["planned_storage"] == result.pipeline.storage_report().to_dict()
    (subtask,) = metrics["subtasks"]
    assert subtask["classes"] == [0, 1, 2, 3] and len(subtask["loss_history"]["mtt"]) == TINY_RUN["iterations"]
    saved = json.loads((output_dir / "config.json").read_text())
    assert saved["iterations"] == TINY_RUN["iterations"]
    assert saved["mixed_precision"] == "no"  # the precision it ran in, though the config left it to Accelerate
    with PIL.Image.open(output_dir / "samples.png") as grid:  # a named row of 8 images per class, drawn large
        assert grid.width >= 8 * 60 and grid.height >= 4 * 60

    pipe = D3Pipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.latent_store.config.class_ids == [0, 1, 2, 3]
    assert pipe.latent_store.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    assert len(pipe.decoder.generators) == 1 and pipe.decoder.config.resolution == 16
    soft = pipe.latent_store.soft_labels
    assert torch.isfinite(soft).all() and torch.allclose(soft.sum(1), torch.ones(8), atol=1e-5)
    a = pipe(include_means=True, generator=torch.Generator().manual_seed(0), output_type="pt")
    b = result.pipeline(include_means=True, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(a.images, b.images) and torch.equal(a.soft_labels, b.soft_labels)


def test_a_rerun_of_other_teacher_epochs_retrains_only_the_teacher(runs, fmnist4_folder, caplog, tmp_path):
    """The experts and the subtask are reused under their keys; the teacher and the evaluation are new stages."""
    output_dir = runs[0]  # the stages; the result goes elsewhere, so the other tests still read the first run's
    settings = {"dataset": str(fmnist4_folder), "output_dir": str(tmp_path), "stage_dir": str(output_dir), **TINY_RUN}
    kept = {p: p.stat().st_mtime_ns for kind in ("experts", "subtasks", "teacher", "evaluations")
            for p in stage_folders(output_dir, kind)}
    with caplog.at_level("INFO", logger="hf_d3"):
        run_distillation(D3Config.from_dict({**settings, "teacher_epochs": TINY_RUN["teacher_epochs"] + 1}))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing of the first settings was touched or withdrawn
    new = {kind: [p for p in stage_folders(output_dir, kind) if p not in kept]
           for kind in ("experts", "subtasks", "teacher", "evaluations")}
    assert {kind: len(folders) for kind, folders in new.items()} == {"experts": 0, "subtasks": 0, "teacher": 1,
                                                                       "evaluations": 1}
    assert re.search(r"teacher: new settings, made in .*teacher/teacher-\w+ \(1 of other settings kept", caplog.text)
    assert re.search(r"subtask 0: reused from .*subtasks/subtask0-\w+", caplog.text)


def test_a_rerun_of_another_expert_lr_makes_new_experts_and_subtasks(runs, fmnist4_folder, caplog, tmp_path):
    output_dir = runs[0]
    config = D3Config.from_dict({"dataset": str(fmnist4_folder), "output_dir": str(tmp_path),
                                 "stage_dir": str(output_dir), **TINY_RUN})
    other = replace(config, experts=replace(config.experts, expert_lr=config.experts.expert_lr * 2))
    plan, other_plan = tiny_plan(config), tiny_plan(other)
    assert plan.experts[0][0].key != other_plan.experts[0][0].key
    assert plan.subtask_stages[0].key != other_plan.subtask_stages[0].key  # its experts are others
    assert plan.teacher.key != other_plan.teacher.key  # trained with the experts' optimiser
    with caplog.at_level("INFO", logger="hf_d3"):
        run_distillation(other)
    assert other_plan.experts[0][0].is_complete(output_dir) and other_plan.subtask_stages[0].is_complete(output_dir)
    assert plan.experts[0][0].is_complete(output_dir) and plan.subtask_stages[0].is_complete(output_dir)  # kept
    assert re.search(r"subtask 0 expert 0: new settings \(1 expert\(s\) of other settings kept", caplog.text)
    assert re.search(r"subtask 0: new settings, made in .*subtasks/subtask0-\w+ \(1 of other", caplog.text)


def test_the_evaluate_recipe_trains_the_runs_own_student(runs):
    """`recipes/evaluate.py RUN_DIR` reads the run's config.json: the same students, steps and seeds, so the same
    accuracies (one thread, as the run had); an override on the command line changes the student."""
    output_dir = runs[0]
    recipe = Path(__file__).parents[1] / "recipes" / "evaluate.py"

    def evaluate(*overrides: str, fails: bool = False) -> dict | str:
        done = subprocess.run([sys.executable, str(recipe), str(output_dir), *overrides], capture_output=True,
                              text=True, timeout=300)
        if fails:
            assert done.returncode != 0
            return done.stderr
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    metrics = json.loads((output_dir / "metrics.json").read_text())
    again = evaluate()
    assert {k: again[k] for k in ("accuracies", "student_architecture", "student_steps")} == {
        k: metrics[k] for k in ("accuracies", "student_architecture", "student_steps")}
    changed = evaluate("--eval_steps", "3", "--eval_seeds", "2")
    assert (changed["student_steps"], changed["num_eval_runs"]) == (3, 2)
    error = evaluate("--dataset", "builtin:fashion_mnist", fails=True)  # 10 classes, the pipeline's 4
    assert "the pipeline has 4 classes but the test split of dataset='builtin:fashion_mnist' has 10" in error


def test_the_evaluate_recipe_names_what_it_cannot_load(tmp_path):
    recipe = Path(__file__).parents[1] / "recipes" / "evaluate.py"
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for source, message in ((tmp_path / "unfinished", "is a run folder without pipeline/: the run has not finished"),
                            (tmp_path / "mistyped", "no D3 pipeline at .*mistyped': no such local path, and as a Hub")):
        done = subprocess.run([sys.executable, str(recipe), str(source)], capture_output=True, text=True, env=env)
        assert done.returncode == 1 and re.search(message, done.stderr), done.stderr[-1000:]


def test_a_teacher_checkpoint_labels_the_components(runs, fmnist4_folder, tmp_path):
    output_dir, *_ = runs
    torch.manual_seed(0)
    teacher = make_net(num_labels=4).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    rerun = tmp_path / "rerun"
    result = run_distillation(D3Config.from_dict({**TINY_RUN, "dataset": str(fmnist4_folder), "output_dir": str(rerun),
                                                  "stage_dir": str(output_dir),  # the distilled subtask, reused
                                                  "teacher": str(tmp_path / "teacher")}))
    store, decoder = result.pipeline.latent_store, result.pipeline.decoder
    weight = json.loads((rerun / "config.json").read_text())["hard_label_weight"]  # chosen from the storage
    assert weight == hard_label_weight_for(result.metrics.planned_storage["ipc_equivalent"])
    with torch.no_grad():
        soft = teacher(decoder.eval()(store.mean, store.component_subtask)).logits.softmax(1)
    expected = weight * nn.functional.one_hot(store.component_class, 4) + (1 - weight) * soft
    assert torch.allclose(store.soft_labels, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Resuming a subtask whose experts are on disk
# ----------------------------------------------------------------------------------------------------------


def _distill_subtask_1(dataset: Path, folder: Path, **overrides) -> dict:
    """Subtask 1 of TINY_RUN (warm-started) distilled into `folder`, its experts trained first if missing."""
    train = load_image_dataset(str(dataset), "train")
    config = D3Config.from_dict({**TINY_RUN, "dataset": str(dataset), "output_dir": str(folder), "init": "real",
                                 "num_subtasks": 2, **overrides})
    plan = make_plan(config, train.features["label"].names, "no")
    train_expert_trajectories(config, plan, train, torch.device("cpu"))
    store, decoder, stats = distilled_subtask(config, plan, 1, train, torch.device("cpu"))
    return {"latent_store": store, "decoder": decoder, "stats": stats, "folder": plan.subtask_stages[1].folder(folder)}


def _assert_same_subtask(got: dict, expected: dict) -> None:
    assert got["stats"].iterations_run == expected["stats"].iterations_run
    assert torch.equal(got["latent_store"].mean, expected["latent_store"].mean)
    for name, value in expected["decoder"].state_dict().items():
        assert torch.equal(got["decoder"].state_dict()[name], value), name


def test_a_finished_subtask_is_continued_when_the_config_asks_for_more(fmnist4_folder, tmp_path):
    fresh = _distill_subtask_1(fmnist4_folder, tmp_path / "fresh")
    first = _distill_subtask_1(fmnist4_folder, tmp_path / "more", iterations=1)
    done = first["folder"] / "stage.json"
    assert first["stats"].iterations_run == 1 and done.is_file()
    again = done.stat().st_mtime_ns
    _distill_subtask_1(fmnist4_folder, tmp_path / "more", iterations=1)
    assert done.stat().st_mtime_ns == again  # as much as asked: reused
    _assert_same_subtask(_distill_subtask_1(fmnist4_folder, tmp_path / "more"), fresh)


def test_a_resumed_subtask_equals_an_uninterrupted_one(fmnist4_folder, tmp_path):
    fresh = _distill_subtask_1(fmnist4_folder, tmp_path / "fresh")
    # its checkpoint holds the state after the warm start
    subtask = _distill_subtask_1(fmnist4_folder, tmp_path / "resumed", iterations=0)["folder"]
    for name in ("stage.json", "latent_store", "decoder"):  # as if the job died after its warm start
        shutil.rmtree(subtask / name, ignore_errors=True)
        (subtask / name).unlink(missing_ok=True)
    warm_started = (subtask / "warm_start.json").stat().st_mtime_ns
    resumed = _distill_subtask_1(fmnist4_folder, tmp_path / "resumed")
    assert (subtask / "warm_start.json").stat().st_mtime_ns == warm_started  # not warm-started again
    assert resumed["stats"].warm_start_mse == fresh["stats"].warm_start_mse is not None
    assert resumed["stats"].iterations_run == TINY_RUN["iterations"]
    _assert_same_subtask(resumed, fresh)
