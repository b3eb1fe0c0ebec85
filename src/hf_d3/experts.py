"""Expert trajectories: networks trained on real data, their parameters saved after every epoch."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import kill_point, staged, write_json
from .augment import dsa_augmentation
from .models.classifiers import CLASSIFIERS
from .progress import progress_bar

logger = logging.getLogger(__name__)

def flat_parameters(model: nn.Module) -> torch.Tensor:
    """Every parameter of `model`, detached, as one flat vector (the layout of a trajectory's epochs)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    augment: bool = True,
    desc: str = "expert",
    momentum: float = 0.0,
) -> list[torch.Tensor]:
    """SGD on hard labels (plain, as for the reference experts, unless `momentum` is given); returns the flat
    parameters before and after every epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    augmentation = dsa_augmentation(images.shape[-1], images.shape[1]) if augment else nn.Identity()
    trajectory = [flat_parameters(model)]
    model.train()
    for _ in progress_bar(range(epochs), desc=desc, leave=False):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = nn.functional.cross_entropy(model(augmentation(images[batch])).logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        trajectory.append(flat_parameters(model))
        kill_point("epoch")
    return trajectory


TRAJECTORY_FILE = "trajectory.safetensors"


def save_trajectory(folder: Path, model_config: dict, trajectory: list[torch.Tensor]) -> None:
    """An expert's folder: its classifier config (`config.json`) and its trajectory, epoch 0..E as `epoch_{e}`."""
    write_json(folder / "config.json", model_config)
    tensors = {f"epoch_{e}": p.contiguous() for e, p in enumerate(trajectory)}
    with staged(folder / TRAJECTORY_FILE) as staging:
        save_file(tensors, str(staging), metadata={"num_epochs": str(len(trajectory) - 1)})


def load_trajectory(folder: Path) -> tuple[nn.Module, torch.Tensor]:
    """An untrained network of the expert's architecture, and its trajectory [epochs + 1, num_params]."""
    config = json.loads((Path(folder) / "config.json").read_text())
    config_cls, model_cls = next(v for v in CLASSIFIERS.values() if v[0].model_type == config["model_type"])
    model = model_cls(config_cls.from_dict(config))
    tensors = load_file(str(Path(folder) / TRAJECTORY_FILE))
    return model, torch.stack([tensors[f"epoch_{e}"] for e in range(len(tensors))])


def train_expert(
    build_model: Callable[[], nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    augment: bool = True,
    desc: str = "expert",
) -> tuple[dict, list[torch.Tensor]]:
    """One expert from `seed` alone (so any process can train it): its classifier config and trajectory."""
    torch.manual_seed(seed)
    model = build_model()
    start = time.perf_counter()
    trajectory = train_classifier(model, images, labels, epochs, lr, batch_size,
                                  torch.Generator().manual_seed(seed), augment, desc=desc)
    logger.info("%s: trained %d epochs on %d images in %.1f s", desc, epochs, len(images), time.perf_counter() - start)
    return model.config.to_dict(), [p.cpu() for p in trajectory]
