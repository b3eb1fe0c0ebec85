"""Baselines at equal storage (docs/method.md, Storage): random real images with hard labels (R+H) or a teacher's
soft labels (R+S), and explicit prototypes distilled with D3's own objective."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .config import DistillationConfig
from .data import ImageTensors, SubtaskData
from .distill.distiller import take_step
from .distill.losses import FlatModel, mmd2_unbiased, real_per_class, trajectory_matching_loss
from .evaluation import EpochSampler
from .progress import progress_bar
from .teacher import teacher_labels


def pick_per_class(labels: torch.Tensor, num_classes: int, images_per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of a seeded random `images_per_class` images of every class, class by class."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([
        torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=generator)]
        [:images_per_class] for c in range(num_classes)
    ])


def random_real_sampler(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    images_per_class: int,
    seed: int = 0,
    teacher: torch.nn.Module | None = None,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
) -> EpochSampler:
    """A fixed random subset of `images_per_class` real images per class, the same every epoch, labelled
    one-hot (R+H) or by the teacher (R+S: `hf_d3.teacher.teacher_labels` at `temperature` and
    `hard_label_weight`, the labels D3's Gaussians get)."""
    picked = pick_per_class(labels, num_classes, images_per_class, seed)
    subset = images[picked]
    if teacher is None:
        targets = nn.functional.one_hot(labels[picked], num_classes).float()
    else:
        targets = teacher_labels(teacher, subset, temperature, labels[picked], hard_label_weight)
    return lambda _generator: (subset, targets)


def distill_prototypes(
    prototypes: torch.Tensor,
    data: SubtaskData,
    trajectories: list[tuple[nn.Module, torch.Tensor]],
    config: DistillationConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict]:
    """Explicit prototype images optimised by D3's objective, the counterpart D3 claims to beat at equal storage.

    `prototypes` [num_classes * ipc, C, H, W] (class by class, local labels as in `data`; start them from real
    images) are optimised in pixel space for `config.iterations` iterations (or `max_distill_time_s`): trajectory
    matching from the same experts, then per-class MMD on their features, as `distill_subtask` does for latents
    and decoder. The pixels take the latents' optimiser (SGD, `lr_latents`, momentum 0.5) and are clipped to
    [0, 1] after every step. Returns the prototypes and {"iterations_run", "iterations_wall_time_s"}.
    """
    images = nn.Parameter(prototypes.clone())
    ipc = len(images) // len(data.class_ids)
    local_label = torch.arange(len(data.class_ids), device=images.device).repeat_interleave(ipc)
    syn_lr = torch.tensor(config.syn_lr_init, requires_grad=True)
    pixels = torch.optim.SGD([images], lr=config.lr_latents, momentum=0.5)
    learnt_lr = torch.optim.SGD([syn_lr], lr=config.lr_lr, momentum=0.5)
    nets = [FlatModel(model) for model, _ in trajectories]
    batch = config.syn_batch_size or len(images)
    n = config.mmd_samples_per_class
    start, iterations_run = time.perf_counter(), 0
    for iteration in progress_bar(range(config.iterations), desc="prototypes", leave=False):
        if config.max_distill_time_s is not None and time.perf_counter() - start >= config.max_distill_time_s:
            break
        if config.mtt_weight > 0:
            i = int(torch.randint(len(nets), (1,), generator=generator))
            epoch = int(torch.randint(config.max_start_epoch, (1,), generator=generator))
            picks = [torch.randperm(len(images), generator=generator)[:batch] for _ in range(config.syn_steps)]
            loss = trajectory_matching_loss(nets[i], trajectories[i][1][epoch],
                                            trajectories[i][1][epoch + config.expert_epochs],
                                            [(images[b], local_label[b]) for b in picks], syn_lr)
            take_step(loss, config.mtt_weight, [pixels, learnt_lr], "trajectory matching", iteration)
        if config.mmd_weight > 0:
            i = int(torch.randint(len(nets), (1,), generator=generator))
            flat = trajectories[i][1][int(torch.randint(len(trajectories[i][1]), (1,), generator=generator))]
            real = nets[i].features(flat, data.images[real_per_class(data, n, generator)])
            fake = nets[i].features(flat, images)
            loss = sum(mmd2_unbiased(real[c * n:(c + 1) * n], fake[c * ipc:(c + 1) * ipc], config.mmd_bandwidths)
                       for c in range(len(data.class_ids)))
            take_step(loss, config.mmd_weight, [pixels], "MMD", iteration)
        with torch.no_grad():
            images.clamp_(0, 1)
        iterations_run += 1
    return images.detach(), {"iterations_run": iterations_run, "iterations_wall_time_s": time.perf_counter() - start}


def split_held_out(num_images: int, seed: int, parts: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random 1/`parts` of the training images held out (to choose R+S's temperature), and the rest, the
    pool the baselines' images come from."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[: num_images // parts], order[num_images // parts:]


def choose_temperature(
    score: Callable[[EpochSampler], float],
    pool: ImageTensors,
    images_per_class: int,
    teacher: nn.Module,
    temperatures: Sequence[float],
    seed: int = 0,
    known: Mapping[str, float] | None = None,
    hard_label_weight: float = 0.0,
) -> tuple[float, dict[str, float]]:
    """The R+S temperature whose student scores best by `score` (a student trained on `images_per_class` pool
    images labelled at that temperature and `hard_label_weight`, tested on held-out images). `known` holds scores
    already measured, by `str(temperature)`; returns the best temperature and every score."""
    known = dict(known or {})
    scores = {str(t): known[str(t)] if str(t) in known else score(random_real_sampler(
        pool.images, pool.labels, len(pool.class_names), images_per_class, seed, teacher, t, hard_label_weight))
        for t in temperatures}
    return float(max(scores, key=scores.get)), scores
