"""The evaluation protocol: train a fresh student on data drawn from a distilled set, test on real data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import EvaluationConfig, ExpertConfig
from .factories import net_kwargs
from .models.classifiers import build_classifier
from .progress import progress_bar
from .results import EvaluationResult
from .student_protocol import soft_cross_entropy, student_augmentation, student_optimizer, student_scheduler

if TYPE_CHECKING:
    from .pipelines.pipeline_d3 import D3Pipeline

logger = logging.getLogger(__name__)

# A source of training data: given a generator, one epoch of (images in [0, 1], soft labels).
EpochSampler = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def pipeline_sampler(pipe: D3Pipeline) -> EpochSampler:
    """Every epoch: the mean image of each component plus one fresh sample, with the component's soft label."""

    def sample(generator: torch.Generator):
        out = pipe(include_means=True, num_samples_per_component=1, generator=generator, output_type="pt")
        return out.images, out.soft_labels.float()

    return sample


def epoch_batches(num_images: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One epoch in random order, split into the fewest batches of at most `batch_size`, as equal as possible.

    Not `split(batch_size)`: its last batch holds what is left over (a few images of an epoch, every few steps),
    a penalty set only by how a method's set size falls against the batch size (docs/method.md, Evaluation
    protocol).
    """
    order = torch.randperm(num_images, generator=generator)
    return order.tensor_split(-(-num_images // batch_size))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of a classifier (its `.logits`) on `images`, in eval mode and batches of `batch_size`."""
    model.eval()
    correct = sum((model(images[i:i + batch_size]).logits.argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def train_student(
    student: nn.Module,
    sampler: EpochSampler,
    steps: int,
    batch_size: int = 256,
    lr: float = 0.01,
    augment: bool = True,
    seed: int = 0,
) -> nn.Module:
    """The student protocol (`hf_d3.student_protocol`: soft cross-entropy, augmentation, SGD, the lr decayed at
    half-time) for `steps` steps, each epoch in equal batches of at most `batch_size` (`epoch_batches`).

    Counting optimiser steps rather than epochs lets methods with different set sizes be compared.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = student_optimizer(student.parameters(), lr)
    scheduler = student_scheduler(optimizer, steps)
    device = next(student.parameters()).device
    augmentation = student_augmentation(student.config.image_size, student.config.num_channels, augment)
    student.train()
    batches = iter(())
    for _ in progress_bar(range(steps), desc="student", leave=False):
        batch = next(batches, None)
        if batch is None:  # a new epoch: fresh samples from the distilled set, on the student's device
            images, targets = (t.to(device) for t in sampler(generator))
            batches = iter(epoch_batches(len(images), batch_size, generator))
            batch = next(batches)
        loss = soft_cross_entropy(student(augmentation(images[batch])).logits, targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return student


def evaluate_sampler(
    sampler: EpochSampler,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    architecture: str = "convnet",
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 0.01,
    augment: bool = True,
    seeds: int = 3,
    first_seed: int = 0,
    **net_kwargs,
) -> EvaluationResult:
    """Final-step test accuracy of `seeds` students trained from scratch (never the best checkpoint), seeded
    `first_seed`, `first_seed + 1`, ...: each student depends on its seed alone, so more seeds can be added later
    (`first_seed=3, seeds=2` gives the two students that `seeds=5` would add to `seeds=3`). The students train on
    the device of `test_images`."""
    accuracies = []
    for seed in progress_bar(range(first_seed, first_seed + seeds), desc="evaluation seeds"):
        torch.manual_seed(seed)
        student = build_classifier(architecture, test_images.shape[1], test_images.shape[-1], num_classes,
                                   **net_kwargs).to(test_images.device)
        train_student(student, sampler, steps, batch_size, lr, augment, seed)
        accuracies.append(accuracy(student, test_images, test_labels))
        logger.info("student %d/%d (%s, %d steps): accuracy %.4f on the test split", seed + 1, first_seed + seeds,
                    architecture, steps, accuracies[-1])
    values = torch.tensor(accuracies)
    return EvaluationResult(accuracy_mean=values.mean().item(), accuracy_std=values.std().item() if seeds > 1 else 0.0,
                            accuracies=accuracies, num_eval_runs=seeds, student_architecture=architecture,
                            student_steps=steps)


def evaluate_with_config(config: EvaluationConfig, networks: ExpertConfig, sampler: EpochSampler,
                         images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         seeds: int | None = None, first_seed: int = 0) -> EvaluationResult:
    """`evaluate_sampler` with a run's student settings (architecture, steps, batch, lr, augmentation; the width
    and depth of its networks)."""
    return evaluate_sampler(sampler, images, labels, num_classes, config.eval_architecture, config.eval_steps,
                            config.eval_batch_size, config.eval_lr, config.eval_augment,
                            config.eval_seeds if seeds is None else seeds, first_seed,
                            **net_kwargs(config.eval_architecture, networks.net_width, networks.net_depth))
