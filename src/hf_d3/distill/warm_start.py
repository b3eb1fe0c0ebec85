"""`init: real`: fit the decoder and the Gaussians to real images before distilling (docs/method.md,
Initialisation)."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..atomic import kill_point
from ..data import RealImages
from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore, folded_ids
from ..progress import progress_bar

logger = logging.getLogger(__name__)


def warm_start(store: GaussianLatentStore, decoder: D3Decoder, data: RealImages, steps: int, lr: float,
               generator: torch.Generator, images_per_component: int = 1, batch_size: int = 256,
               prior_weight: float = 0.01) -> float | None:
    """Fit the decoder to reconstruct `images_per_component` real images per component (a class with fewer images
than its components need uses them in turn).

    Every real image gets a free latent (generative latent optimisation), pulled towards its component's mean
    by `prior_weight`; each component then becomes the Gaussian of its images' latents (mean, per-dimension
    variance, at least 0.01), so samples decode to images like those real ones rather than copies of one.
    Returns the reconstruction error (mean squared, pixels in [0, 1]) over the last 10 % of the steps, or None
    with `steps=0` (nothing was fitted; the components still become the Gaussians of their images' latents).
    """
    m, r = store.config.latents_per_class, images_per_component
    if min(len(x) for x in data.indices_by_class) < r:
        raise ValueError(f"init=real needs {r} real images per class; some class of {folded_ids(data.class_ids)} "
                         f"has fewer (init_images_per_component={r})")
    # pick the images by index first, then read only those (the cache holds the rest); a class with fewer than
    # m x r images uses them in turn, so components share images (each still gets r different ones)
    targets = data.images[torch.cat([x[torch.randperm(len(x), generator=generator)].repeat(-(-m * r // len(x)))
                                     [:m * r] for x in data.indices_by_class])]
    component = torch.arange(store.num_components, device=targets.device).repeat_interleave(r)
    latents = nn.Parameter(store.mean.detach()[component] + 0.1 * torch.randn(
        len(targets), store.config.latent_dim, generator=generator).to(targets.device))
    optimizer = torch.optim.Adam([latents, store.mean, *decoder.parameters()], lr=lr)
    decoder.train()
    start = time.perf_counter()
    tail = max(1, steps // 10)
    tail_error = torch.zeros((), device=targets.device)  # summed on the device: no sync per step
    for step in progress_bar(range(steps), desc="warm start", leave=False):
        batch = torch.randperm(len(targets), generator=generator)[:batch_size].to(targets.device)
        error = nn.functional.mse_loss(decoder(latents[batch]), targets[batch])
        loss = error + prior_weight * (latents[batch] - store.mean[component[batch]]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        kill_point("warm start step")
        if step >= steps - tail:
            tail_error += error.detach()
    store.fit_to(latents.detach().view(store.num_components, r, -1))
    mse = (tail_error / tail).item() if steps else None
    logger.info("warm start: %d steps on %d real images in %.1f s, reconstruction MSE %s", steps, len(targets),
                time.perf_counter() - start, "-" if mse is None else f"{mse:.4f}")
    return mse
