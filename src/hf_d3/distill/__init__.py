"""Distilling one subtask (docs/method.md, Objective): the losses, the warm start, the loop, what it learns and its
checkpoints."""

from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .distiller import distill_loop, distill_subtask, refresh_batchnorm
from .losses import FlatModel, class_mmd_parts, mmd2_unbiased, trajectory_matching_loss
from .synthetic import LatentSet, PrototypeSet, SyntheticSet
from .warm_start import warm_start

__all__ = [
    "FlatModel",
    "LatentSet",
    "PrototypeSet",
    "SyntheticSet",
    "class_mmd_parts",
    "distill_loop",
    "distill_subtask",
    "has_checkpoint",
    "load_checkpoint",
    "mmd2_unbiased",
    "refresh_batchnorm",
    "save_checkpoint",
    "trajectory_matching_loss",
    "warm_start",
]
