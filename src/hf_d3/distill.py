"""Distilling one subtask: trajectory matching (MTT) and distribution matching (MMD) into latents + decoder."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .models.decoder import D3Decoder
from .models.latent_store import GaussianLatentStore


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Unbiased MMD^2 between samples x [n, d] and y [m, d] with a sum of Gaussian kernels."""
    xy = torch.cat([x, y])
    sq_dist = torch.cdist(xy, xy).pow(2)
    kernel = sum(torch.exp(-sq_dist / (2 * s**2)) for s in bandwidths)
    n, m = len(x), len(y)
    k_xx, k_yy, k_xy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    return ((k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
            + (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
            - 2 * k_xy.mean())


class FlatModel:
    """Calls a network with its parameters given as one flat vector, so an unrolled SGD loop is differentiable."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.sizes = [p.numel() for p in model.parameters()]

    def params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def logits(self, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.params(flat), (images,)).logits

    def features(self, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        kwargs = {"output_hidden_states": True}
        return functional_call(self.model, self.params(flat), (images,), kwargs).hidden_states[-1]


def trajectory_matching_loss(
    net: FlatModel,
    start: torch.Tensor,
    target: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    syn_lr: torch.Tensor,
) -> torch.Tensor:
    """||theta_N - theta_target||^2 / ||theta_start - theta_target||^2 after one SGD step per batch.

    The inner steps keep their graph (create_graph), so the loss is differentiable in the images and
    in `syn_lr`.
    """
    params = start.clone().requires_grad_(True)
    for images, labels in batches:
        loss = nn.functional.cross_entropy(net.logits(params, images), labels)
        (grad,) = torch.autograd.grad(loss, params, create_graph=True)
        params = params - syn_lr * grad
    return (params - target).pow(2).sum() / (start - target).pow(2).sum()


@dataclass
class SubtaskData:
    """The real data of one subtask; `labels` are local (0..n-1), `class_ids` maps them to global ids."""

    images: torch.Tensor
    labels: torch.Tensor
    class_ids: list[int]


def warm_start(store: GaussianLatentStore, decoder: D3Decoder, data: SubtaskData, steps: int, lr: float,
               generator: torch.Generator, images_per_component: int = 1, batch_size: int = 256,
               prior_weight: float = 0.01) -> float | None:
    """`init: real`: fit the decoder to reconstruct `images_per_component` real images per component.

    Every real image gets a free latent (generative latent optimisation), pulled towards its component's mean
    by `prior_weight`; each component then becomes the Gaussian of its images' latents (mean, per-dimension
    variance, at least 0.01), so samples decode to images like those real ones rather than copies of one.
    Returns the reconstruction error (mean squared, pixels in [0, 1]) over the last 10 % of the steps, or None
    with `steps=0` (nothing was fitted; the components still become the Gaussians of their images' latents).
    """
    m, r = store.config.latents_per_class, images_per_component
    per_class = [data.images[data.labels == local] for local in range(len(data.class_ids))]
    targets = torch.cat([x[torch.randperm(len(x), generator=generator)[:m * r]] for x in per_class])
    if len(targets) != store.num_components * r:
        raise ValueError(f"init=real needs {m * r} real images per class; some class of {data.class_ids} has fewer "
                         f"({m} latents x {r} images per component)")
    component = torch.arange(store.num_components, device=targets.device).repeat_interleave(r)
    latents = nn.Parameter(store.mean.detach()[component] + 0.1 * torch.randn(
        len(targets), store.config.latent_dim, generator=generator).to(targets.device))
    optimizer = torch.optim.Adam([latents, store.mean, *decoder.parameters()], lr=lr)
    decoder.train()
    tail = max(1, steps // 10)
    tail_error = torch.zeros((), device=targets.device)  # summed on the device: no sync per step
    for step in tqdm(range(steps), desc="warm start", leave=False):
        batch = torch.randperm(len(targets), generator=generator)[:batch_size].to(targets.device)
        error = nn.functional.mse_loss(decoder(latents[batch]), targets[batch])
        loss = error + prior_weight * (latents[batch] - store.mean[component[batch]]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= steps - tail:
            tail_error += error.detach()
    store.fit_to(latents.detach().view(store.num_components, r, -1))
    return (tail_error / tail).item() if steps else None


def _mmd_step_loss(store, decoder, data, embed, samples_per_class, bandwidths, generator) -> torch.Tensor:
    """Sum over classes of MMD^2 between embedded real images and decoded samples (all classes in one batch)."""
    m = store.config.latents_per_class
    n_classes = len(data.class_ids)
    # n samples per class spread evenly over the class's m components; when m > n a random n of them, so every
    # component gets MMD gradients over the iterations, not only the first n
    rounds = -(-samples_per_class // m)
    components = torch.cat([
        c * m + torch.cat([torch.randperm(m, generator=generator) for _ in range(rounds)])[:samples_per_class]
        for c in range(n_classes)
    ])
    latents, _ = store.sample(components.to(store.mean.device), generator=generator)
    fake = embed(decoder(latents))
    real_index = torch.cat([
        torch.nonzero(data.labels == c).flatten()[
            torch.randint(int((data.labels == c).sum()), (samples_per_class,), generator=generator)]
        for c in range(n_classes)
    ])
    real = embed(data.images[real_index])
    return sum(
        mmd2_unbiased(real[c * samples_per_class:(c + 1) * samples_per_class],
                      fake[c * samples_per_class:(c + 1) * samples_per_class], bandwidths)
        for c in range(n_classes)
    )


@torch.no_grad()
def refresh_batchnorm(decoder: D3Decoder, store: GaussianLatentStore, passes: int, generator: torch.Generator):
    """Recompute the decoder's running statistics as an average over batches of all components, so that
    eval-mode decoding (what the pipeline does) matches what distillation optimised."""
    norms = [m for m in decoder.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    decoder.train()
    for _ in range(passes):
        latents, index = store.sample(generator=generator)
        decoder(latents, store.component_subtask[index])
    for norm in norms:
        norm.momentum = 0.1
    decoder.eval()


def distill_subtask(
    store: GaussianLatentStore,
    decoder: D3Decoder,
    data: SubtaskData,
    trajectories: list[tuple[nn.Module, torch.Tensor]],
    config,
    generator: torch.Generator,
    checkpoint_dir: Path | None = None,
    desc: str = "distill",
) -> dict:
    """Optimise `store` and `decoder` (both of one subtask) for `config.iterations` iterations (or until
    `config.max_distill_time_s`).

    Each iteration is up to two optimiser steps: trajectory matching against a random expert and start
    epoch (if `mtt_weight` > 0), then per-class MMD on a random expert's penultimate features (if
    `mmd_weight` > 0). Returns the loss history, the final synthetic learning rate, the number of
    iterations run and their wall time.

    With `checkpoint_dir`, the starting state, every `checkpoint_every` iterations and the end state are saved
    there (`save_checkpoint`), and a checkpoint already there is resumed from: the iterations and time limit
    count the iterations before it, and the run continues as it would have without the interruption. The
    learning rates are the config's, so a run stopped by a NaN loss can resume with lower ones.
    """
    syn_lr = torch.tensor(config.syn_lr_init, requires_grad=True)
    optimizers = {
        "latents": torch.optim.SGD([store.mean, store.logvar], lr=config.lr_latents, momentum=0.5),
        "decoder": torch.optim.Adam(decoder.parameters(), lr=config.lr_decoder, weight_decay=1e-5),
        "lr": torch.optim.SGD([syn_lr], lr=config.lr_lr, momentum=0.5),
    }
    mtt_optimizers = list(optimizers.values())
    mmd_optimizers = [optimizers["latents"], optimizers["decoder"]]
    local_label = torch.arange(store.num_components) // store.config.latents_per_class
    batch = config.syn_batch_size or store.num_components
    nets = [FlatModel(model) for model, _ in trajectories]
    progress = {"iterations_wall_time_s": 0.0, "loss_history": {"mtt": [], "mmd": []}}
    if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
        progress = load_checkpoint(checkpoint_dir, store, decoder, syn_lr, optimizers, generator)
    history = progress["loss_history"]

    def iterations_run() -> int:  # an iteration counts once its losses are in the history
        return len(history["mtt"] or history["mmd"])

    def checkpoint() -> None:
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, store, decoder, syn_lr, optimizers, generator, {
                "iterations_run": iterations_run(), "loss_history": history,
                "iterations_wall_time_s": progress["iterations_wall_time_s"] + time.perf_counter() - start})

    def pick_expert():
        i = int(torch.randint(len(trajectories), (1,), generator=generator))
        return nets[i], trajectories[i][1]

    def check_finite(loss: torch.Tensor, term: str, iteration: int) -> None:
        if torch.isfinite(loss):
            return
        # The parameters have not been stepped with this loss yet: they are the last good state.
        checkpoint()
        where = "" if checkpoint_dir is None else f"; the last good state is saved in {checkpoint_dir}"
        raise FloatingPointError(
            f"the {term} loss became {loss.item()} at iteration {iteration}{where}. "
            "Lower the learning rates (lr_latents, lr_decoder, lr_lr) or syn_lr_init, and rerun to resume."
        )

    decoder.train()
    start = time.perf_counter()
    if iterations_run() == 0:
        checkpoint()  # after the warm start, which can be most of a subtask's time
    first = iterations_run()
    for iteration in tqdm(range(first, config.iterations), desc=desc, leave=False, initial=first,
                          total=config.iterations):
        elapsed = progress["iterations_wall_time_s"] + time.perf_counter() - start
        if config.max_distill_time_s is not None and elapsed >= config.max_distill_time_s:
            break
        losses = {}
        if config.mtt_weight > 0:
            net, trajectory = pick_expert()
            start_epoch = int(torch.randint(config.max_start_epoch, (1,), generator=generator))
            batches = []
            for _ in range(config.syn_steps):
                components = torch.randperm(store.num_components, generator=generator)[:batch]
                latents, _ = store.sample(components, generator=generator)
                batches.append((decoder(latents), local_label[components]))
            loss = trajectory_matching_loss(net, trajectory[start_epoch],
                                            trajectory[start_epoch + config.expert_epochs], batches, syn_lr)
            losses["mtt"] = loss
            check_finite(loss, "trajectory matching", iteration)
            for opt in mtt_optimizers:
                opt.zero_grad(set_to_none=True)
            (config.mtt_weight * loss).backward()
            for opt in mtt_optimizers:
                opt.step()
        if config.mmd_weight > 0:
            net, trajectory = pick_expert()
            flat = trajectory[int(torch.randint(len(trajectory), (1,), generator=generator))]
            loss = _mmd_step_loss(store, decoder, data, partial(net.features, flat),
                                  config.mmd_samples_per_class, config.mmd_bandwidths, generator)
            losses["mmd"] = loss
            check_finite(loss, "MMD", iteration)
            for opt in mmd_optimizers:
                opt.zero_grad(set_to_none=True)
            (config.mmd_weight * loss).backward()
            for opt in mmd_optimizers:
                opt.step()
        for name, loss in losses.items():
            history[name].append(loss.item())
        if (iteration + 1) % config.checkpoint_every == 0:
            checkpoint()
    checkpoint()  # so that a rerun with more iterations continues from here
    iterations_wall_time = progress["iterations_wall_time_s"] + time.perf_counter() - start
    refresh_batchnorm(decoder, store, passes=10, generator=generator)
    return {"loss_history": history, "syn_lr": syn_lr.item(), "iterations_run": iterations_run(),
            "iterations_wall_time_s": iterations_wall_time}


def save_checkpoint(folder: Path, store: GaussianLatentStore, decoder: D3Decoder, syn_lr: torch.Tensor,
                    optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator, progress: dict) -> None:
    """Everything `distill_subtask` needs to continue exactly: latents, decoder, optimiser states, the learnable
    lr and the generator (`state.safetensors`), and `progress.json`. Written beside the folder, then swapped in,
    so a job killed mid-write leaves the previous checkpoint whole."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    store.save_pretrained(staging / "latent_store")
    decoder.save_pretrained(staging / "decoder")
    tensors = {f"optimizer.{name}.{index}.{key}": value.detach().clone()
               for name, opt in optimizers.items() for index, state in opt.state_dict()["state"].items()
               for key, value in state.items() if isinstance(value, torch.Tensor)}
    tensors |= {"syn_lr": syn_lr.detach().reshape(1).clone(), "generator": generator.get_state()}
    save_file(tensors, staging / "state.safetensors")
    (staging / "progress.json").write_text(json.dumps(progress))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def has_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a complete `save_checkpoint` (its progress file is written last)."""
    return (folder / "progress.json").is_file()


def load_checkpoint(folder: Path, store: GaussianLatentStore, decoder: D3Decoder, syn_lr: torch.Tensor,
                    optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator) -> dict:
    """Load a `save_checkpoint` folder into these modules, optimisers and generator; returns its progress."""
    for module, saved in ((store, GaussianLatentStore.from_pretrained(folder / "latent_store")),
                          (decoder, D3Decoder.from_pretrained(folder / "decoder"))):
        changed = sorted(k for k in {*saved.config, *module.config}
                         if not k.startswith("_") and saved.config.get(k) != module.config.get(k))
        if changed:
            raise ValueError(f"the checkpoint in {folder} has another {type(module).__name__} ({changed} differ "
                             "from this config): rerun with its sizes, or delete it to start this subtask afresh")
        module.load_state_dict(saved.state_dict())
    tensors = load_file(folder / "state.safetensors")
    for name, opt in optimizers.items():
        state = {}
        for key, value in tensors.items():
            if key.startswith(f"optimizer.{name}."):
                index, field = key.removeprefix(f"optimizer.{name}.").split(".")
                state.setdefault(int(index), {})[field] = value
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    with torch.no_grad():
        syn_lr.copy_(tensors["syn_lr"][0])
    generator.set_state(tensors["generator"])
    return json.loads((folder / "progress.json").read_text())


@torch.no_grad()
def relabel(store: GaussianLatentStore, decoder: D3Decoder, teacher: nn.Module, temperature: float = 1.0) -> None:
    """Give every component the soft label softmax(teacher(decoder(mean)) / temperature)."""
    num_classes = store.config.num_classes
    if teacher.config.num_labels != num_classes:
        raise ValueError(
            f"the teacher predicts {teacher.config.num_labels} classes but the dataset has {num_classes}; "
            "give a teacher trained on this dataset's label space"
        )
    teacher.eval()
    decoder.eval()
    images = decoder(store.mean, store.component_subtask)
    store.soft_labels.copy_((teacher(images).logits / temperature).softmax(dim=1))
