"""The relabelling teacher and `relabel` (docs/method.md, Relabelling): every Gaussian gets the teacher's soft
label of its mean image."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForImageClassification

from .atomic import staged
from .config import D3Config
from .data import ImageCache, load_images
from .distill.distiller import DECODE_PART
from .experts import train_classifier
from .factories import build_net
from .models.decoder import D3Decoder
from .models.latent_store import GaussianLatentStore, keep_top_k

if TYPE_CHECKING:
    from .run_plan import RunPlan

logger = logging.getLogger(__name__)

# IPC-equivalents where labels stop being the teacher's alone and become the class alone (`hard_label_weight_for`)
HARD_LABEL_SPAN = (1.0, 50.0)


def load_teacher(config: D3Config, plan: RunPlan, train: Dataset | ImageCache, device: torch.device) -> nn.Module:
    """The relabelling teacher: the given `teacher` checkpoint; else the one an earlier run trained under the same
    settings (its stage, `hf_d3.stages.teacher_stage`); else a global expert trained on all classes and all training
    images (`max_train_per_class` bounds only the experts and MMD) with momentum 0.9 for `teacher_epochs`, kept as
    that stage."""
    if config.relabel.teacher:
        logger.info("teacher: %s", config.relabel.teacher)
        return AutoModelForImageClassification.from_pretrained(config.relabel.teacher).to(device)
    stage, folder = plan.teacher, plan.teacher.folder(plan.stage_dir)
    logger.info("teacher: %s", stage.describe_reuse(plan.stage_dir))
    if stage.is_complete(plan.stage_dir):
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
    wall_time = time.perf_counter() - start
    logger.info("teacher: trained %d epochs on all %d training images in %.1f s", config.relabel.teacher_epochs,
                len(real.images), wall_time)
    with staged(folder) as staging:
        teacher.save_pretrained(staging)
    stage.complete(plan.stage_dir, {"training_images": len(real.images), "wall_time_s": wall_time})
    return teacher


def hard_label_weight_for(ipc_equivalent: float) -> float:
    """The `hard_label_weight` a set of this storage gets when the config leaves it unset: 0 (the teacher's soft
    labels alone) up to HARD_LABEL_SPAN[0] IPC-equivalent, 1 (the class alone) from HARD_LABEL_SPAN[1], log-linear
    in between.

    Measured on the curve's Fashion-MNIST D3 sets (81.8 % teacher, 3 students each, BENCHMARKS.md, Accuracy against
    storage): soft labels win at 1 IPC-equivalent (61.3 % against 60.5 % at weight 0.5 and 53.5 % at 1), a mix at 10
    (74.5 % at 0.5, 74.2 % at 1, 72.5 % at 0), the class at 50 (76.4 % at 1, 75.6 % at 0.5, 73.5 % at 0): the more
    images a set holds, the more the teacher's mistakes cost and the less its view of similar classes adds.
    """
    low, high = HARD_LABEL_SPAN
    return min(1.0, max(0.0, math.log(ipc_equivalent / low) / math.log(high / low)))


@torch.no_grad()
def teacher_labels(teacher: nn.Module, images: torch.Tensor, temperature: float = 1.0,
                   classes: torch.Tensor | None = None, hard_label_weight: float = 0.0,
                   label_top_k: int | None = None) -> torch.Tensor:
    """softmax(teacher(images) / temperature), mixed with the one-hot `classes` at `hard_label_weight`, each label
    then cut to its `label_top_k` largest probabilities, renormalised (`keep_top_k`; None: whole).

    The mix is knowledge distillation's hard-plus-soft target (Hinton et al., 2015): the soft cross-entropy is linear
    in its target, so a mixed label trains like the weighted sum of the two losses. It matters when the teacher is
    weak: on the curve's 50 IPC-equivalent Fashion-MNIST set the 81.8 % teacher put its largest probability on
    another class for 19 % of the Gaussians (BENCHMARKS.md, Accuracy against storage).
    """
    teacher.eval()
    soft = (teacher(images).logits / temperature).softmax(dim=1)
    if hard_label_weight == 0:
        return keep_top_k(soft, label_top_k)
    if classes is None:
        raise ValueError(f"hard_label_weight={hard_label_weight} needs the images' classes")
    hard = nn.functional.one_hot(classes.to(soft.device), soft.shape[1]).to(soft.dtype)
    return keep_top_k(hard_label_weight * hard + (1 - hard_label_weight) * soft, label_top_k)


@torch.no_grad()
def relabel(store: GaussianLatentStore, decoder: D3Decoder, teacher: nn.Module, temperature: float = 1.0,
            hard_label_weight: float = 0.0) -> None:
    """Give every component the label `teacher_labels` gives its mean image (decoded in eval mode)."""
    num_classes = store.config.num_classes
    if teacher.config.num_labels != num_classes:
        raise ValueError(
            f"the teacher predicts {teacher.config.num_labels} classes but the dataset has {num_classes}; "
            "give a teacher trained on this dataset's label space"
        )
    decoder.eval()
    parts = -(-store.num_components // DECODE_PART)  # memory: one part up to DECODE_PART components
    store.set_soft_labels(torch.cat([
        teacher_labels(teacher, decoder(mean, subtask), temperature, classes, hard_label_weight)
        for mean, subtask, classes in zip(store.mean.tensor_split(parts), store.component_subtask.tensor_split(parts),
                                          store.component_class.tensor_split(parts))]))
