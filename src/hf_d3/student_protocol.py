"""The student protocol (docs/method.md, Evaluation protocol): the loss, augmentation, optimiser and schedule every
student of a distilled set learns with, whether `hf_d3.evaluation.train_student` trains it (the run's students, the
benchmarks) or `transformers.Trainer` does (`hf_d3.student_training.SoftLabelTrainer`, recipes/train_student.py).
Both take them from here, so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .augment import dsa_augmentation

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LR_DECAY = 0.1  # applied once, at half of the training


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch mean of -sum(targets * log_softmax(logits)): cross-entropy against soft labels."""
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def student_augmentation(resolution: int, channels: int, augment: bool = True) -> nn.Module:
    """DSA augmentation of batches in [0, 1] (`hf_d3.augment.dsa_augmentation`), or the identity when `augment` is
    off (the `eval_augment` setting)."""
    return dsa_augmentation(resolution, channels) if augment else nn.Identity()


def student_optimizer(parameters: Iterable[torch.Tensor], lr: float, weight_decay: float = WEIGHT_DECAY
                      ) -> torch.optim.SGD:
    """SGD with momentum `MOMENTUM` and `weight_decay` on every parameter given."""
    return torch.optim.SGD(parameters, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)


def student_scheduler(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """The learning rate x`LR_DECAY` once `steps // 2` of the `steps` optimiser steps are done."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[steps // 2], gamma=LR_DECAY)
