"""The distillation loop on any device: no host reads in the unroll, bf16 autocast (off by default, the unroll and
decoder kept in float32), the optional compiled inner step, and float32 results equal to the plain loop's."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_RUN
from torch import nn

from hf_d3 import D3Decoder, GaussianLatentStore, allocator, build_classifier
from hf_d3.allocator import tune_malloc
from hf_d3.config import D3Config, DistillationConfig, RunConfig
from hf_d3.data import RealImages
from hf_d3.distill import FlatModel, distill_subtask, trajectory_matching_loss
from hf_d3.distill.losses import compiled_sgd_step, sgd_step
from hf_d3.distill.synthetic import draw_unroll
from hf_d3.experts import flat_parameters
from hf_d3.run import make_accelerator, run_distillation

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def tiny(seed: int = 0):
    """A 4-class 16x16 grayscale subtask: store, decoder, real data and one expert with a 4-epoch trajectory."""
    torch.manual_seed(seed)
    store = GaussianLatentStore([0, 1, 2, 3], num_classes=4, latents_per_class=2, latent_dim=8)
    decoder = D3Decoder(latent_dim=8, resolution=16, out_channels=1, channels=[8, 8, 8])
    net = build_classifier("convnet", num_channels=1, image_size=16, num_labels=4, width=8, depth=2)
    start = flat_parameters(net)
    trajectory = torch.stack([start + 0.05 * e * torch.randn_like(start) for e in range(4)])
    data = RealImages(torch.rand(40, 1, 16, 16), torch.arange(4).repeat_interleave(10), [0, 1, 2, 3])
    return store, decoder, data, [(net, trajectory)]


def config(**overrides) -> DistillationConfig:
    values = {"iterations": 3, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 2, "syn_batch_size": 6,
              "mmd_samples_per_class": 4, "lr_latents": 1e-2, "lr_decoder": 1e-3, "lr_lr": 1e-4,
              "checkpoint_every": 10**9}
    return DistillationConfig(**{**values, **overrides})


# ----------------------------------------------------------------------------------------------------------
# No host reads in the unroll. On a CPU there is no CUDA sync debug mode; the meta device is the structural check
# that exists: its tensors have shapes but no values, so .item(), .cpu(), .tolist(), bool() or float() of one
# raises. A loop that runs there queues device work only.


def _meta_unroll(make_step=None) -> tuple[torch.Tensor, GaussianLatentStore, torch.Tensor]:
    """The decode and unroll of 3 steps on the meta device (`make_step(FlatModel)`: the inner step, default eager);
    returns the loss, the store and the learnable lr."""
    store, decoder, _, [(net, trajectory)] = tiny()
    meta = torch.device("meta")
    store, decoder, net, trajectory = store.to(meta), decoder.to(meta), net.to(meta), trajectory.to(meta)
    components, noise = draw_unroll(store, 3, 6, torch.Generator().manual_seed(0))
    labels = (torch.arange(8) // 2).to(meta)
    batches = [(decoder(store.sample(c, noise=z)[0]), labels[c]) for c, z in zip(components, noise)]
    syn_lr = torch.tensor(0.01, device=meta, requires_grad=True)
    flat_net = FlatModel(net)
    step = make_step(flat_net) if make_step else None
    loss = trajectory_matching_loss(flat_net, trajectory[0], trajectory[2], batches, syn_lr, step)
    return loss, store, syn_lr


def test_the_decode_and_unroll_read_nothing_on_the_host():
    loss, store, syn_lr = _meta_unroll()
    loss.backward()  # the outer backward through the unroll too
    assert loss.device.type == "meta" and store.mean.grad.shape == store.mean.shape and syn_lr.grad is not None


def test_the_meta_check_catches_a_host_read():
    """The check above can fail: an inner step that reads one value on the host is refused on the meta device."""

    def step_that_reads(net: FlatModel):
        def step(params, images, labels, lr):
            new = sgd_step(net, params, images, labels, lr)
            float(new.detach().norm())  # e.g. a log line inside the unroll
            return new
        return step

    with pytest.raises((RuntimeError, NotImplementedError)):
        _meta_unroll(step_that_reads)


# ----------------------------------------------------------------------------------------------------------
# bf16 autocast


@pytest.fixture
def fresh_accelerate_state(monkeypatch):
    """Accelerate keeps one process-wide state; an Accelerator of another mixed precision needs it reset."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_mixed_precision_is_off_by_default(fresh_accelerate_state, tmp_path):
    assert RunConfig().mixed_precision is None
    accelerator = make_accelerator(RunConfig(output_dir=str(tmp_path)), cpu=True)
    assert accelerator.mixed_precision == "no"
    with accelerator.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_mixed_precision_bf16_reaches_the_accelerators_autocast(fresh_accelerate_state, tmp_path):
    accelerator = make_accelerator(RunConfig(output_dir=str(tmp_path), mixed_precision="bf16"), cpu=True)
    assert accelerator.mixed_precision == "bf16"
    with accelerator.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_a_whole_run_in_bf16(fresh_accelerate_state, fmnist4_folder, tmp_path):
    """`mixed_precision: bf16` end to end (experts, warm start, distillation, teacher, students): it finishes, and
    the stored latents and decoder are float32."""
    settings = {"dataset": str(fmnist4_folder), "output_dir": str(tmp_path), **TINY_RUN, "mixed_precision": "bf16"}
    result = run_distillation(D3Config.from_dict(settings))
    store, decoder = result.pipeline.latent_store, result.pipeline.decoder
    assert store.mean.dtype == torch.float32 and all(p.dtype == torch.float32 for p in decoder.parameters())
    assert 0 <= result.metrics.accuracy_mean <= 1
    assert all(math.isfinite(v) for s in result.metrics.subtasks for vs in s.loss_history.values() for v in vs)


def test_fp16_is_refused():
    with pytest.raises(ValueError, match="mixed_precision"):
        RunConfig(mixed_precision="fp16")


def test_an_fp16_launch_is_refused_before_any_work(fresh_accelerate_state, fmnist4_folder, tmp_path):
    """As `accelerate launch --mixed_precision fp16` gives it: the config leaves the precision to the launch."""
    config = D3Config.from_dict({"dataset": str(fmnist4_folder), "output_dir": str(tmp_path), **TINY_RUN})
    accelerator = make_accelerator(config.run, cpu=True, mixed_precision="fp16")
    with pytest.raises(ValueError, match="mixed_precision='fp16' is not valid"):
        run_distillation(config, accelerator)
    assert not list(tmp_path.iterdir())  # nothing trained or written


def test_under_bf16_autocast_the_unroll_and_decoder_stay_float32_and_the_embedding_does_not():
    """Two iterations of both terms, plain and inside bf16 autocast, from the same state: the first trajectory
    matching loss (decoder + unroll, both opted out) is bit for bit the float32 one; the MMD loss (its embedding
    network in bf16) differs, so autocast was really on; everything stays finite."""
    histories = []
    for autocast in (False, True):
        store, decoder, data, trajectories = tiny()
        with torch.autocast(**BF16, enabled=autocast):
            stats = distill_subtask(store, decoder, data, trajectories, config(iterations=2),
                                    torch.Generator().manual_seed(0))
        assert store.mean.dtype == torch.float32 and all(p.dtype == torch.float32 for p in decoder.parameters())
        histories.append(stats.loss_history)
    fp32, bf16 = histories
    assert bf16["mtt"][0] == fp32["mtt"][0]
    assert bf16["mmd"][0] != fp32["mmd"][0]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in bf16.values())


def test_the_decoder_decodes_in_float32_under_autocast():
    _, decoder, _, _ = tiny()
    latents = torch.randn(5, 8)
    with torch.autocast(**BF16):
        images = decoder(latents)
    assert images.dtype == torch.float32 and torch.equal(images, decoder(latents))


# ----------------------------------------------------------------------------------------------------------
# float32 results unchanged


def reference_mtt_losses(store, decoder, trajectories, cfg: DistillationConfig, generator) -> list[float]:
    """The trajectory-matching loop written out plainly (the loop as first written): sample and decode step by step,
    unroll with `autograd.grad(create_graph=True)`, the paper's three optimisers."""
    syn_lr = torch.tensor(cfg.syn_lr_init, requires_grad=True)
    optimizers = [torch.optim.SGD([store.mean, store.logvar], lr=cfg.lr_latents, momentum=0.5),
                  torch.optim.Adam(decoder.parameters(), lr=cfg.lr_decoder, weight_decay=1e-5),
                  torch.optim.SGD([syn_lr], lr=cfg.lr_lr, momentum=0.5)]
    label = torch.arange(store.num_components) // store.config.latents_per_class
    losses = []
    decoder.train()
    for _ in range(cfg.iterations):
        model, trajectory = trajectories[int(torch.randint(len(trajectories), (1,), generator=generator))]
        start = int(torch.randint(cfg.max_start_epoch, (1,), generator=generator))
        params = trajectory[start].clone().requires_grad_(True)
        for _ in range(cfg.syn_steps):
            components = torch.randperm(store.num_components, generator=generator)[:cfg.syn_batch_size]
            latents, _ = store.sample(components, generator=generator)
            logits = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()],
                                                                _split(params, model))), (decoder(latents),)).logits
            (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, label[components]), params,
                                          create_graph=True)
            params = params - syn_lr * grad
        target = trajectory[start + cfg.expert_epochs]
        loss = (params - target).pow(2).sum() / (trajectory[start] - target).pow(2).sum()
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
    return losses


def _split(flat: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    shapes = [p.shape for p in model.parameters()]
    return [t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)]


def test_float32_trajectory_matching_losses_equal_a_plain_reference():
    cfg = config(iterations=4, mmd_weight=0.0)
    store, decoder, data, trajectories = tiny()
    stats = distill_subtask(store, decoder, data, trajectories, cfg, torch.Generator().manual_seed(0))
    store, decoder, _, trajectories = tiny()
    expected = reference_mtt_losses(store, decoder, trajectories, cfg, torch.Generator().manual_seed(0))
    assert stats.loss_history["mtt"] == pytest.approx(expected, rel=1e-6)
    assert len(set(expected)) == len(expected)  # the state moved: later iterations test the optimisers too


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_allocator_is_tuned_once_and_can_be_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", {})
    monkeypatch.setenv("HF_D3_TUNE_MALLOC", "0")
    assert tune_malloc() == {}  # opted out
    monkeypatch.delenv("HF_D3_TUNE_MALLOC")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")  # given by the environment: left to it
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TOP_PAD_", raising=False)
    first = tune_malloc()
    assert first == {"MALLOC_MMAP_THRESHOLD_": False, "MALLOC_TRIM_THRESHOLD_": True, "MALLOC_TOP_PAD_": True}
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert tune_malloc() == first  # once: a second call changes nothing


# ----------------------------------------------------------------------------------------------------------
# torch.compile of the inner step


def test_a_compiled_step_refuses_experts_of_two_architectures():
    """One compiled function serves every expert only when they share an architecture; refused before compiling."""
    store, decoder, data, trajectories = tiny()
    wider = build_classifier("convnet", num_channels=1, image_size=16, num_labels=4, width=16, depth=2)
    trajectories.append((wider, flat_parameters(wider).expand(4, -1).clone()))
    with pytest.raises(ValueError, match="compile_inner_step needs experts of one architecture"):
        distill_subtask(store, decoder, data, trajectories, config(iterations=1, compile_inner_step=True),
                        torch.Generator().manual_seed(0))


def test_the_compiled_inner_step_matches_the_eager_one():
    """torch.compile with inductor (a C++ compiler on a CPU): 31 s with a cold cache on the CPU box, 2026-12-04."""
    store, decoder, _, [(net, trajectory)] = tiny()
    flat_net = FlatModel(net)
    components, noise = draw_unroll(store, 2, 6, torch.Generator().manual_seed(0))
    labels = torch.arange(8) // 2
    results = []
    for step in (None, compiled_sgd_step(flat_net)):
        store.zero_grad()
        syn_lr = torch.tensor(0.01, requires_grad=True)
        batches = [(decoder(store.sample(c, noise=z)[0]), labels[c]) for c, z in zip(components, noise)]
        loss = trajectory_matching_loss(flat_net, trajectory[0], trajectory[2], batches, syn_lr, step)
        loss.backward()
        results.append((loss.detach(), store.mean.grad.clone(), syn_lr.grad.clone()))
    (eager_loss, eager_grad, eager_lr), (loss, grad, lr) = results
    assert loss == pytest.approx(eager_loss.item(), rel=1e-5)
    assert (grad - eager_grad).norm() <= 1e-2 * eager_grad.norm() and lr == pytest.approx(eager_lr.item(), rel=1e-2)
