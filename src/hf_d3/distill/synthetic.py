"""What the distillation loop (`distill_loop`) learns: a synthetic set of one subtask's classes, D3's Gaussian latents
and decoder or explicit prototype images, behind one small interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import DistillationConfig
from ..data import RealImages
from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore
from .checkpoint import load_checkpoint, save_checkpoint
from .losses import class_mmd_parts, per_class_mmd, real_per_class

Embed = Callable[[torch.Tensor], torch.Tensor]


class SyntheticSet(ABC):
    """A distilled set being learnt (docs/method.md, Objective): the images it draws differentiably, class by class,
    and the students' learning rate `syn_lr` that trajectory matching learns beside them.

    `labels[i]` is the local class of item i (a component or a prototype), items class by class. `image_optimizers`
    step what the images are made of (both terms of the objective); `optimizers` adds "lr", last, which steps
    `syn_lr` (trajectory matching only).
    """

    def __init__(self, image_optimizers: dict[str, torch.optim.Optimizer], labels: torch.Tensor,
                 config: DistillationConfig):
        self.labels = labels
        self.syn_lr = torch.tensor(config.syn_lr_init, device=labels.device, requires_grad=True)
        self.image_optimizers = image_optimizers
        self.optimizers = {**image_optimizers,
                           "lr": torch.optim.SGD([self.syn_lr], lr=config.lr_lr, momentum=0.5)}

    @abstractmethod
    def unroll_batches(self, steps: int, batch: int, generator: torch.Generator
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(images, local labels) of `batch` random items for each of the `steps` unrolled student steps."""

    @abstractmethod
    def mmd_parts(self, data: RealImages, embed: Embed, samples_per_class: int, bandwidths: Sequence[float],
                  generator: torch.Generator) -> Iterable[torch.Tensor]:
        """The sum over classes of MMD^2 between embedded real images of `data` and this set's images, in parts
        whose sum it is (each can be backpropagated before the next is built)."""

    def end_iteration(self) -> None:  # noqa: B027 (optional: the latents need nothing here)
        """Called after each iteration's optimiser steps."""

    def save(self, folder: Path, generator: torch.Generator, progress: dict) -> None:
        """Save the set, its optimisers, `syn_lr`, `generator` and the loop's `progress` in `folder`."""
        raise NotImplementedError(f"a {type(self).__name__} keeps no checkpoints: give checkpoint_dir=None")

    def load(self, folder: Path, generator: torch.Generator) -> dict:
        """Load what `save` wrote in `folder` into this set and `generator`; returns the loop's progress."""
        raise NotImplementedError(f"a {type(self).__name__} keeps no checkpoints: give checkpoint_dir=None")


def draw_unroll(store: GaussianLatentStore, steps: int, batch: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The components [steps, batch] and standard normal noise [steps, batch, latent_dim] of every unrolled step,
    drawn in the order `store.sample` draws them (so the samples are those of sampling step by step), on the
    generator's device, then moved to the store's in one copy each."""
    components, noise = [], []
    for _ in range(steps):
        components.append(torch.randperm(store.num_components, generator=generator)[:batch])
        noise.append(torch.randn(len(components[-1]), store.mean.shape[1], generator=generator,
                                 device=generator.device))
    device = store.mean.device
    return torch.stack(components).to(device), torch.stack(noise).to(device)


class LatentSet(SyntheticSet):
    """D3's set: a subtask's Gaussian latents and decoder, the images decoded samples. The means and log-variances
    take SGD (momentum 0.5, `lr_latents`), the decoder Adam (`lr_decoder`, weight decay 1e-5); the decoder trains
    (batch statistics) until `refresh_batchnorm`."""

    def __init__(self, store: GaussianLatentStore, decoder: D3Decoder, config: DistillationConfig):
        self.store, self.decoder = store, decoder
        labels = (torch.arange(store.num_components) // store.config.latents_per_class).to(store.mean.device)
        super().__init__({
            "latents": torch.optim.SGD([store.mean, store.logvar], lr=config.lr_latents, momentum=0.5),
            "decoder": torch.optim.Adam(decoder.parameters(), lr=config.lr_decoder, weight_decay=1e-5),
        }, labels, config)
        decoder.train()

    def unroll_batches(self, steps, batch, generator):
        components, noise = draw_unroll(self.store, steps, batch, generator)
        return [(self.decoder(self.store.sample(c, noise=z)[0]), self.labels[c]) for c, z in zip(components, noise)]

    def mmd_parts(self, data, embed, samples_per_class, bandwidths, generator):
        return class_mmd_parts(self.store, self.decoder, data, embed, samples_per_class, bandwidths, generator)

    def save(self, folder, generator, progress):
        save_checkpoint(folder, self.store, self.decoder, self.syn_lr, self.optimizers, generator, progress)

    def load(self, folder, generator):
        return load_checkpoint(folder, self.store, self.decoder, self.syn_lr, self.optimizers, generator)


class PrototypeSet(SyntheticSet):
    """Explicit prototype images [num_classes * ipc, C, H, W], class by class, optimised in pixel space with the
    latents' optimiser (SGD, momentum 0.5, `lr_latents`) and clipped to [0, 1] after every iteration."""

    def __init__(self, prototypes: torch.Tensor, num_classes: int, config: DistillationConfig):
        self.images = nn.Parameter(prototypes.clone())
        ipc = len(self.images) // num_classes
        labels = torch.arange(num_classes, device=self.images.device).repeat_interleave(ipc)
        super().__init__({"pixels": torch.optim.SGD([self.images], lr=config.lr_latents, momentum=0.5)}, labels,
                         config)

    def unroll_batches(self, steps, batch, generator):
        picks = [torch.randperm(len(self.images), generator=generator)[:batch] for _ in range(steps)]
        return [(self.images[b], self.labels[b]) for b in picks]

    def mmd_parts(self, data, embed, samples_per_class, bandwidths, generator):
        real = embed(data.images[real_per_class(data, samples_per_class, generator)])
        return [per_class_mmd(real, embed(self.images), len(data.class_ids), bandwidths)]  # every prototype

    @torch.no_grad()
    def end_iteration(self):
        self.images.clamp_(0, 1)
