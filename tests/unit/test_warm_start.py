"""The warm start (`hf_d3.distill.warm_start`, init: real): latents and decoder fitted to real images."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_store_and_decoder
from torch import nn

from hf_d3.data import RealImages
from hf_d3.distill import warm_start


def test_warm_start_fits_real_images(data):
    store, decoder = make_store_and_decoder()
    targets = torch.cat([data.images[data.labels == c][:2] for c in range(4)])
    with torch.no_grad():
        before = nn.functional.mse_loss(decoder.eval()(store.mean), targets).item()
    error = warm_start(store, decoder, data, steps=30, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(store.logvar, torch.full_like(store.logvar, math.log(0.01)))
    with torch.no_grad():
        after = nn.functional.mse_loss(decoder.train()(store.mean), targets).item()
    assert after < 0.5 * before
    assert error < 0.5 * before  # the reported reconstruction error is that of the fitted decoder

    # several real images per component: each component becomes the Gaussian of its images' latents
    store, decoder = make_store_and_decoder()
    warm_start(store, decoder, data, steps=30, lr=1e-2, generator=torch.Generator().manual_seed(0),
               images_per_component=5, prior_weight=0.0)
    assert store.logvar.exp().min() >= 0.01 - 1e-6 and store.logvar.exp().max() > 0.011  # a spread was fitted
    with pytest.raises(ValueError, match=r"needs 1000 real images per class; .* \(init_images_per_component=1000"):
        warm_start(store, decoder, data, steps=1, lr=1e-2, generator=torch.Generator().manual_seed(0),
                   images_per_component=1000)

    # no steps, no error to report: None, which json writes as null (NaN is not JSON)
    store, decoder = make_store_and_decoder()
    assert warm_start(store, decoder, data, steps=0, lr=1e-2, generator=torch.Generator().manual_seed(0)) is None

    # a class of fewer images than components: its one image serves both of its components
    short = RealImages(data.images[:3], torch.tensor([0, 0, 1]), [0, 1])
    store, decoder = make_store_and_decoder(class_ids=(0, 1))
    warm_start(store, decoder, short, steps=0, lr=1e-2, generator=torch.Generator().manual_seed(0), prior_weight=0.0)
    assert torch.isfinite(store.mean).all() and not torch.equal(store.mean[2], store.mean[3])  # own latents each
    with pytest.raises(ValueError, match=r"init=real needs 2 real images per class; some class of \[0, 1\]"):
        warm_start(store, decoder, short, steps=1, lr=1e-2, generator=torch.Generator().manual_seed(0),
                   images_per_component=2)
