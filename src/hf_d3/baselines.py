"""Baselines at equal storage (docs/method.md, Storage): random real images with hard labels (R+H) or a teacher's
soft labels (R+S), the same stored at a lower resolution so more of them fit (R+S-low), and explicit prototypes
distilled with D3's own objective."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .config import DistillationConfig
from .data import RealImages
from .distill.distiller import distill_loop
from .distill.synthetic import PrototypeSet
from .evaluation import EpochSampler
from .teacher import teacher_labels


def pick_per_class(labels: torch.Tensor, num_classes: int, images_per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of a seeded random `images_per_class` images of every class, class by class."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([
        torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=generator)]
        [:images_per_class] for c in range(num_classes)
    ])


def stored_smaller(images: torch.Tensor, downsample: int) -> torch.Tensor:
    """`images` [N, C, H, W] in [0, 1] as R+S-low stores them: `downsample` times smaller on each side (area
    averaging) and rounded to uint8 levels, as an image dataset keeps its pixels."""
    if downsample < 1 or images.shape[-1] % downsample or images.shape[-2] % downsample:
        raise ValueError(f"downsample={downsample} must be a whole divisor of the image side {images.shape[-1]}")
    smaller = nn.functional.interpolate(images, scale_factor=1 / downsample, mode="area") if downsample > 1 else images
    return (smaller * 255).round() / 255


def shown_at(stored: torch.Tensor, side: int) -> torch.Tensor:
    """Stored images upsampled (bilinearly) to the `side` the students train at."""
    if stored.shape[-1] == side:
        return stored
    return nn.functional.interpolate(stored, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)


def random_real_sampler(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    images_per_class: int,
    seed: int = 0,
    teacher: torch.nn.Module | None = None,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    downsample: int = 1,
    label_top_k: int | None = None,
) -> EpochSampler:
    """A fixed random subset of `images_per_class` real images per class, the same every epoch, labelled
    one-hot (R+H) or by the teacher (R+S: `hf_d3.teacher.teacher_labels` at `temperature`, `hard_label_weight` and
    `label_top_k`, the labels D3's Gaussians get). With `downsample` > 1 (R+S-low) the images are stored that
    many times smaller per side (`stored_smaller`) and shown to students and teacher upsampled to the training side
    (`shown_at`)."""
    picked = pick_per_class(labels, num_classes, images_per_class, seed)
    subset = images[picked]
    if downsample > 1:
        subset = shown_at(stored_smaller(subset, downsample), images.shape[-1])
    if teacher is None:
        targets = nn.functional.one_hot(labels[picked], num_classes).float()
    else:
        targets = teacher_labels(teacher, subset, temperature, labels[picked], hard_label_weight, label_top_k)
    return lambda _generator: (subset, targets)


def distill_prototypes(
    prototypes: torch.Tensor,
    data: RealImages,
    trajectories: list[tuple[nn.Module, torch.Tensor]],
    config: DistillationConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict]:
    """Explicit prototype images optimised by D3's objective, the counterpart D3 claims to beat at equal storage.

    `prototypes` [num_classes * ipc, C, H, W] (class by class, local labels as in `data`; start them from real
    images) are optimised in pixel space for `config.iterations` iterations (or `max_distill_time_s`): trajectory
    matching from the same experts, then per-class MMD on their features, as `distill_subtask` does for latents
    and decoder (`hf_d3.distill.distiller.distill_loop` on a `PrototypeSet`: the pixels take the latents'
    optimiser and are clipped to [0, 1] after every iteration). Returns the prototypes and {"iterations_run",
    "iterations_wall_time_s"}.
    """
    synthetic = PrototypeSet(prototypes, len(data.class_ids), config)
    stats = distill_loop(synthetic, data, trajectories, config, generator, desc="prototypes")
    return synthetic.images.detach(), {"iterations_run": stats.iterations_run,
                                       "iterations_wall_time_s": stats.iterations_wall_time_s}


def split_held_out(num_images: int, seed: int, parts: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random 1/`parts` of the training images held out (to choose R+S's temperature), and the rest, the
    pool the baselines' images come from."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[: num_images // parts], order[num_images // parts:]


def choose_temperature(score_at: Callable[[float], float], temperatures: Sequence[float],
                       known: Mapping[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """The soft labels' temperature whose student scores best on held-out images, `score_at(t)` scoring a student
    trained on a set labelled at `t`; `known` holds scores already measured, by `str(t)`, which are not measured
    again. Returns the best temperature and every score (docs/method.md, Storage)."""
    known = dict(known or {})
    scores = {str(t): known[str(t)] if str(t) in known else score_at(t) for t in temperatures}
    return float(max(scores, key=scores.get)), scores
