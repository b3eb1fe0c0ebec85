"""Differentiable-siamese-style augmentation (crop, cutout, flip, scale, rotate, colour) with kornia."""

from __future__ import annotations

import kornia.augmentation as K
from torch import nn


def dsa_augmentation(resolution: int, channels: int) -> nn.Module:
    """The DSA family of augmentations for images in [0, 1]; each image gets its own random draw.

    Colour jitter applies to RGB images only (saturation has no meaning in grayscale).
    """
    colour = [K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, p=1.0)] if channels == 3 else []
    return K.AugmentationSequential(
        *colour,
        K.RandomCrop((resolution, resolution), padding=resolution // 8, p=1.0),
        K.RandomErasing(scale=(0.02, 0.25), ratio=(0.5, 2.0), p=0.5),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(degrees=15.0, scale=(0.8, 1.2), p=1.0),
    )
