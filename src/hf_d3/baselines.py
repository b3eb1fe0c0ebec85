"""Prototype baselines at equal storage: random real images with hard labels (R+H) or a teacher's soft labels (R+S)."""

from __future__ import annotations

import torch

from .evaluation import EpochSampler
from .storage import prototype_storage


def largest_ipc_within(budget_values: int, num_classes: int, values_per_image: int, soft_labels: bool) -> int:
    """The most real images per class whose images and labels fit in `budget_values` stored values."""
    ipc = 0
    while prototype_storage(num_classes, ipc + 1, values_per_image, soft_labels) <= budget_values:
        ipc += 1
    return ipc


def random_real_sampler(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    images_per_class: int,
    seed: int = 0,
    teacher: torch.nn.Module | None = None,
    temperature: float = 1.0,
) -> EpochSampler:
    """A fixed random subset of `images_per_class` real images per class, the same every epoch, labelled
    one-hot (R+H) or with softmax(teacher / temperature) (R+S)."""
    generator = torch.Generator().manual_seed(seed)
    picked = torch.cat([
        torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=generator)]
        [:images_per_class] for c in range(num_classes)
    ])
    subset = images[picked]
    if teacher is None:
        targets = torch.nn.functional.one_hot(labels[picked], num_classes).float()
    else:
        teacher.eval()
        with torch.no_grad():
            targets = (teacher(subset).logits / temperature).softmax(dim=1)
    return lambda _generator: (subset, targets)
