"""The relabelling teacher and `relabel` (docs/method.md, Relabelling): every Gaussian gets the teacher's soft
label of its mean image."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForImageClassification

from .atomic import staged
from .config import D3Config
from .data import load_images
from .experts import train_classifier
from .factories import build_net
from .models.decoder import D3Decoder
from .models.latent_store import GaussianLatentStore

logger = logging.getLogger(__name__)


def load_teacher(config: D3Config, folder: Path, train: Dataset, device: torch.device) -> nn.Module:
    """The relabelling teacher: the given `teacher` checkpoint; else the one an earlier run saved in `folder`;
    else a global expert trained on all classes and all training images (`max_train_per_class` bounds only the
    experts and MMD) with momentum 0.9 for `teacher_epochs`, saved in `folder`."""
    if config.relabel.teacher:
        logger.info("teacher: %s", config.relabel.teacher)
        return AutoModelForImageClassification.from_pretrained(config.relabel.teacher).to(device)
    if (folder / "config.json").is_file():
        logger.info("teacher: the one an earlier run trained, in %s", folder)
        return AutoModelForImageClassification.from_pretrained(folder).to(device)
    data, experts, seed = config.data, config.experts, config.run.seed
    real = load_images(train, data.resolution, data.channels, image_column=data.image_column,
                      label_column=data.label_column)
    torch.manual_seed(seed)
    teacher = build_net(experts, data, len(real.class_names), device)
    start = time.perf_counter()
    train_classifier(teacher, real.images.to(device), real.labels.to(device), config.relabel.teacher_epochs,
                     experts.expert_lr, experts.expert_batch_size, torch.Generator().manual_seed(seed),
                     experts.expert_augment, desc="global teacher", momentum=0.9)
    logger.info("teacher: trained %d epochs on all %d training images in %.1f s", config.relabel.teacher_epochs,
                len(real.images), time.perf_counter() - start)
    with staged(folder) as staging:  # its config.json marks it saved: it appears with the weights
        teacher.save_pretrained(staging)
    return teacher


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
