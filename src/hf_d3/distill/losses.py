"""The two terms of the D3 objective (docs/method.md, Objective): trajectory matching and per-class MMD."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch import nn
from torch.func import functional_call

from ..data import RealImages
from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore
from ..precision import at_least_float32, full_precision


def _mean_off_diagonal(kernel: torch.Tensor) -> torch.Tensor:
    n = len(kernel)  # a sample of one has no pair: its term is 0 (one prototype per class)
    return (kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1)) if n > 1 else kernel.new_zeros(())


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Unbiased MMD^2 between samples x [n, d] and y [m, d] with a sum of Gaussian kernels.

    Computed in float32 even under autocast: the features may come out of a bf16 network, but squared distances
    between close points lose all their digits in bf16 (8 bits of mantissa)."""
    with full_precision(x.device):
        xy = at_least_float32(torch.cat([x, y]))
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
        """`flat` as the network's named parameters (views, so gradients flow back to `flat`)."""
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def logits(self, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The network's logits on `images` with parameters `flat`."""
        return functional_call(self.model, self.params(flat), (images,)).logits

    def features(self, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The network's last hidden state on `images` with parameters `flat` (the MMD's embedding)."""
        kwargs = {"output_hidden_states": True}
        return functional_call(self.model, self.params(flat), (images,), kwargs).hidden_states[-1]


InnerStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sgd_step(net: FlatModel, params: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
             lr: torch.Tensor) -> torch.Tensor:
    """One differentiable SGD step of the student: `params - lr * grad`, the gradient's graph kept (create_graph)
    so that the step is differentiable in `params`, `images` and `lr`."""
    loss = nn.functional.cross_entropy(net.logits(params, images), labels)
    (grad,) = torch.autograd.grad(loss, params, create_graph=True)
    return params - lr * grad


def functional_sgd_step(net: FlatModel, params: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                        lr: torch.Tensor) -> torch.Tensor:
    """`sgd_step` written with `torch.func.grad`, the form `torch.compile` can trace: AOTAutograd refuses a
    compiled `autograd.grad(create_graph=True)` ("does not currently support double backward"), but it
    differentiates a graph that already holds the inner gradient's ops."""
    grad = torch.func.grad(lambda p: nn.functional.cross_entropy(net.logits(p, images), labels))(params)
    return params - lr * grad


def compiled_sgd_step(net: FlatModel) -> InnerStep:
    """`functional_sgd_step` of `net` through `torch.compile` (the `compile_inner_step` setting). The first call
    compiles (about a minute on a CPU); on the CPU box it was no faster than eager (`git show 8ddb5e0:BENCHMARKS.md`,
    MTT)."""
    return torch.compile(partial(functional_sgd_step, net), dynamic=False)


def trajectory_matching_loss(
    net: FlatModel,
    start: torch.Tensor,
    target: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    syn_lr: torch.Tensor,
    step: InnerStep | None = None,
) -> torch.Tensor:
    """||theta_N - theta_target||^2 / ||theta_start - theta_target||^2 after one SGD step per batch.

    The inner steps keep their graph, so the loss is differentiable in the images and in `syn_lr`. `step` is one
    inner step (`sgd_step` of `net` by default; `compiled_sgd_step` is the compiled one).

    The unroll always runs in float32, even inside an autocast region (bf16 mixed precision): with it in bf16 the
    gradients of the latents, log-variances and decoder came out 9-12 % off (cosine 0.992-0.996) and the lr's 0.1-0.4 %
    (benchmarks/mtt_precision.py). Nothing in the unroll reads a value on the host: it only queues device work
    (tests/unit/test_mixed_precision_loop.py runs it on the meta device, where any such read fails).
    """
    step = step or partial(sgd_step, net)
    with full_precision(start.device):
        params = start.clone().requires_grad_(True)
        for images, labels in batches:
            params = step(params, at_least_float32(images), labels, syn_lr)
        return (params - target).pow(2).sum() / (start - target).pow(2).sum()


def per_class_mmd(real: torch.Tensor, fake: torch.Tensor, num_classes: int, bandwidths: Sequence[float]
                  ) -> torch.Tensor:
    """Sum over classes of MMD^2 between real [num_classes * n, d] and fake [num_classes * k, d] embeddings, each
    class by class."""
    n, k = len(real) // num_classes, len(fake) // num_classes
    return sum(mmd2_unbiased(real[c * n:(c + 1) * n], fake[c * k:(c + 1) * k], bandwidths) for c in range(num_classes))


def real_per_class(data: RealImages, samples_per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (on the CPU) of `samples_per_class` random real images (with replacement) of every class, class by
    class."""
    return torch.cat([indices[torch.randint(len(indices), (samples_per_class,), generator=generator)]
                      for indices in data.indices_by_class])


# the most decoded samples one part of the MMD holds (`class_mmd_parts`): at 200 classes, one graph of all of them
# (decoder and classifier activations, 2,000-4,000 images) was most of a CPU run's peak memory
MMD_PART_IMAGES = 512


def class_mmd_parts(
    store: GaussianLatentStore,
    decoder: D3Decoder,
    data: RealImages,
    embed: Callable[[torch.Tensor], torch.Tensor],
    samples_per_class: int,
    bandwidths: Sequence[float],
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """The sum over classes of MMD^2 between embedded real images and decoded samples, in parts of whole classes
    (at most `MMD_PART_IMAGES` samples each, or one class): their sum is the loss, and each part's graph can be
    backpropagated and freed before the next is built. Everything random is drawn first, for all classes, so the
    draws do not depend on the parts; a set of one part computes exactly what one batch would (the decoder's batch
    statistics are a part's)."""
    m = store.config.latents_per_class
    n_classes = len(data.class_ids)
    # n samples per class spread evenly over the class's m components; when m > n a random n of them, so every
    # component gets MMD gradients over the iterations, not only the first n
    rounds = -(-samples_per_class // m)
    components = torch.cat([
        c * m + torch.cat([torch.randperm(m, generator=generator) for _ in range(rounds)])[:samples_per_class]
        for c in range(n_classes)
    ]).to(store.mean.device)
    # the draws of `store.sample(components, generator=generator)`, taken once for every part
    noise = torch.randn(len(components), store.config.latent_dim, generator=generator, device=generator.device)
    real_rows = real_per_class(data, samples_per_class, generator)
    classes_per_part = max(1, MMD_PART_IMAGES // samples_per_class)
    for first in range(0, n_classes, classes_per_part):
        rows = slice(first * samples_per_class, min(first + classes_per_part, n_classes) * samples_per_class)
        latents, _ = store.sample(components[rows], noise=noise[rows])
        fake = embed(decoder(latents))
        real = embed(data.images[real_rows[rows]])
        yield per_class_mmd(real, fake, len(fake) // samples_per_class, bandwidths)
