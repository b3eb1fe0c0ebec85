"""The two terms of the D3 objective (docs/method.md, Objective): trajectory matching and per-class MMD."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..data import SubtaskData
from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore


def _mean_off_diagonal(kernel: torch.Tensor) -> torch.Tensor:
    n = len(kernel)  # a sample of one has no pair: its term is 0 (one prototype per class)
    return (kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1)) if n > 1 else kernel.new_zeros(())


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Unbiased MMD^2 between samples x [n, d] and y [m, d] with a sum of Gaussian kernels."""
    xy = torch.cat([x, y])
    sq_dist = torch.cdist(xy, xy).pow(2)
    kernel = sum(torch.exp(-sq_dist / (2 * s**2)) for s in bandwidths)
    n = len(x)
    return _mean_off_diagonal(kernel[:n, :n]) + _mean_off_diagonal(kernel[n:, n:]) - 2 * kernel[:n, n:].mean()


class FlatModel:
    """Calls a network with its parameters given as one flat vector, so an unrolled SGD loop is differentiable."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.sizes = [p.numel() for p in model.parameters()]

    def params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def logits(self, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.params(flat), (images,)).logits

    def features(self, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        kwargs = {"output_hidden_states": True}
        return functional_call(self.model, self.params(flat), (images,), kwargs).hidden_states[-1]


def trajectory_matching_loss(
    net: FlatModel,
    start: torch.Tensor,
    target: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    syn_lr: torch.Tensor,
) -> torch.Tensor:
    """||theta_N - theta_target||^2 / ||theta_start - theta_target||^2 after one SGD step per batch.

    The inner steps keep their graph (create_graph), so the loss is differentiable in the images and
    in `syn_lr`.
    """
    params = start.clone().requires_grad_(True)
    for images, labels in batches:
        loss = nn.functional.cross_entropy(net.logits(params, images), labels)
        (grad,) = torch.autograd.grad(loss, params, create_graph=True)
        params = params - syn_lr * grad
    return (params - target).pow(2).sum() / (start - target).pow(2).sum()


def real_per_class(data: SubtaskData, samples_per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `samples_per_class` random real images (with replacement) of every class, class by class."""
    return torch.cat([
        torch.nonzero(data.labels == c).flatten()[
            torch.randint(int((data.labels == c).sum()), (samples_per_class,), generator=generator)]
        for c in range(len(data.class_ids))
    ])


def class_mmd_loss(
    store: GaussianLatentStore,
    decoder: D3Decoder,
    data: SubtaskData,
    embed: Callable[[torch.Tensor], torch.Tensor],
    samples_per_class: int,
    bandwidths: Sequence[float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Sum over classes of MMD^2 between embedded real images and decoded samples (all classes in one batch)."""
    m = store.config.latents_per_class
    n_classes = len(data.class_ids)
    # n samples per class spread evenly over the class's m components; when m > n a random n of them, so every
    # component gets MMD gradients over the iterations, not only the first n
    rounds = -(-samples_per_class // m)
    components = torch.cat([
        c * m + torch.cat([torch.randperm(m, generator=generator) for _ in range(rounds)])[:samples_per_class]
        for c in range(n_classes)
    ])
    latents, _ = store.sample(components.to(store.mean.device), generator=generator)
    fake = embed(decoder(latents))
    real = embed(data.images[real_per_class(data, samples_per_class, generator)])
    return sum(
        mmd2_unbiased(real[c * samples_per_class:(c + 1) * samples_per_class],
                      fake[c * samples_per_class:(c + 1) * samples_per_class], bandwidths)
        for c in range(n_classes)
    )
