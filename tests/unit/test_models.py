"""The three model components: D3Decoder, GaussianLatentStore and the ConvNet / ResNet18_AP classifiers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_d3 import (
    ConvNetConfig,
    ConvNetForImageClassification,
    D3Decoder,
    GaussianLatentStore,
    ResNet18APForImageClassification,
    build_classifier,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------
# D3Decoder
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resolution, channels, kernel, out_channels",
    [(8, [8, 4], 4, 1), (16, [8, 8, 4], 3, 3), (28, [8, 8, 8], 4, 1), (32, [16, 8, 8, 8], 3, 3)],
)
def test_decoder_output_shape_and_range(resolution, channels, kernel, out_channels):
    torch.manual_seed(0)
    decoder = D3Decoder(latent_dim=8, resolution=resolution, out_channels=out_channels, channels=channels,
                        upsample_kernel_size=kernel)
    with torch.no_grad():
        decoder.generators[0].body[-2].weight.mul_(100)  # saturate the tanh: the range must still hold
    images = decoder(torch.randn(5, 8))
    assert images.shape == (5, out_channels, resolution, resolution)
    assert images.min() >= 0 and images.max() <= 1
    assert images.min() < 0.05 and images.max() > 0.95  # the rescaled tanh reaches both ends of [0, 1]


@pytest.mark.parametrize("mode, checkerboard", [("nearest", False), ("bilinear", False), ("transpose", True)])
def test_resize_convolution_decoders_draw_a_flat_feature_map_without_a_checkerboard(mode, checkerboard):
    torch.manual_seed(0)
    decoder = D3Decoder(latent_dim=4, resolution=32, out_channels=1, channels=[4, 4, 4], upsample_mode=mode).eval()
    with torch.no_grad():  # the first feature map is the same value everywhere
        decoder.generators[0].project.weight.zero_()
        decoder.generators[0].project.bias.fill_(1.0)
    interior = decoder(torch.zeros(1, 4))[0, 0, 8:-8, 8:-8]  # away from the zero padding's reach
    spread = (interior.max() - interior.min()).item()
    assert spread > 1e-3 if checkerboard else spread < 1e-6


def test_resize_convolution_stages_cost_what_kernel_3_transposed_ones_do():
    sizes = {"latent_dim": 8, "resolution": 16, "out_channels": 3, "channels": [8, 8, 4]}
    transpose = D3Decoder(**sizes, upsample_kernel_size=3)
    assert n_params(D3Decoder(**sizes, upsample_mode="nearest")) == n_params(transpose)


def test_decoder_without_projection_reshapes_the_latent():
    # one x2 stage to 8x8: the latent is the 8-channel 4x4 first feature map
    decoder = D3Decoder(latent_dim=8 * 4 * 4, resolution=8, out_channels=1, channels=[8, 4], latent_projection=False)
    assert isinstance(decoder.generators[0].project, torch.nn.Identity)
    assert decoder(torch.randn(3, 128)).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"latent_dim=16 must equal channels\[0\] \* 4\*\*2 = 128"):
        D3Decoder(latent_dim=16, resolution=8, out_channels=1, channels=[8, 4], latent_projection=False)


def test_resolution_the_decoder_cannot_produce_names_the_valid_ones():
    with pytest.raises(ValueError) as error:
        D3Decoder(latent_dim=8, resolution=30, out_channels=1, channels=[8, 8, 8])
    message = str(error.value)
    assert "resolution=30" in message and "[8, 12, 16, 20, 24, 28, 32]" in message
    # every resolution the message offers really works with those channels
    for resolution in (8, 12, 16, 20, 24, 28, 32):
        decoder = D3Decoder(latent_dim=8, resolution=resolution, out_channels=1, channels=[8, 8, 8])
        assert decoder(torch.randn(2, 8)).shape == (2, 1, resolution, resolution)
    assert D3Decoder.from_preset("small", resolution=30, out_channels=1).config.channels == [256, 128]  # 15 -> 30
    with pytest.raises(ValueError, match="resolution=27 cannot be reached by doubling"):
        D3Decoder.from_preset("small", resolution=27, out_channels=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"out_channels": 2}, "out_channels=2"),
    ({"upsample_kernel_size": 5}, "upsample_kernel_size=5"),
    ({"upsample_mode": "pixelshuffle"}, r"upsample_mode='pixelshuffle' is not valid; choose one of \['transpose'"),
    ({"channels": [8]}, "cannot be produced"),
])
def test_decoder_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D3Decoder(**{"latent_dim": 8, "resolution": 8, "out_channels": 1, "channels": [8, 4], **kwargs})


def test_decoder_presets_have_the_papers_sizes_at_64():
    """Parameter counts worked out by hand from the paper's layer table (docs/method.md, Reference settings of
    the paper): weights + biases, BatchNorm gamma/beta."""
    # small: Linear(64 -> 256*2*2), ConvT k4 256-128-64-32-32-32, Conv3x3 32 -> 3
    small = (64 * 1024 + 1024) + (256 * 128 * 16 + 128) + (128 * 64 * 16 + 64) + (64 * 32 * 16 + 32) \
        + 2 * (32 * 32 * 16 + 32) + (32 * 3 * 9 + 3) + 2 * (128 + 64 + 32 + 32 + 32)
    # medium: Linear(2048 -> 512*2*2), ConvT k3 512-256-128-64-32-32
    medium = (2048 * 2048 + 2048) + (512 * 256 * 9 + 256) + (256 * 128 * 9 + 128) + (128 * 64 * 9 + 64) \
        + (64 * 32 * 9 + 32) + (32 * 32 * 9 + 32) + (32 * 3 * 9 + 3) + 2 * (256 + 128 + 64 + 32 + 32)
    # large: no Linear (latent 4096 = 1024*2*2), ConvT k3 1024-512-256-128-64-64
    large = (1024 * 512 * 9 + 512) + (512 * 256 * 9 + 256) + (256 * 128 * 9 + 128) + (128 * 64 * 9 + 64) \
        + (64 * 64 * 9 + 64) + (64 * 3 * 9 + 3) + 2 * (512 + 256 + 128 + 64 + 64)
    assert (small, medium, large) == (789_187, 5_774_691, 6_308_547)  # the paper's: ~0.79 M, ~5.8 M, ~6.3 M
    for name, expected, latent_dim in (("small", small, 64), ("medium", medium, 2048), ("large", large, 4096)):
        decoder = D3Decoder.from_preset(name, resolution=64, out_channels=3)
        assert n_params(decoder) == expected, name
        assert decoder.config.latent_dim == latent_dim
        with torch.no_grad():
            assert decoder.eval()(torch.randn(2, latent_dim)).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("resolution, stages", [(28, 2), (32, 4), (64, 5)])
def test_presets_drop_stages_at_small_resolutions(resolution, stages):
    decoder = D3Decoder.from_preset("small", resolution=resolution, out_channels=1, num_subtasks=2, latent_dim=16)
    assert decoder.config.channels == [256, 128, 64, 32, 32, 32][: stages + 1]
    assert decoder.config.latent_dim == 16 and len(decoder.generators) == 2
    with torch.no_grad():
        images = decoder.eval()(torch.randn(3, 16), torch.tensor([0, 1, 1]))
    assert images.shape == (3, 1, resolution, resolution)
    with pytest.raises(ValueError, match="preset 'huge' is unknown"):
        D3Decoder.from_preset("huge", resolution=28, out_channels=1)
    with pytest.raises(ValueError, match="at resolution 28 latent_dim must be 1024 \\* 7\\*\\*2 = 50176, not 4096"):
        D3Decoder.from_preset("large", resolution=28, out_channels=1, latent_dim=4096)
    assert D3Decoder.from_preset("large", resolution=28, out_channels=1).config.latent_dim == 50176


def test_each_latent_goes_through_its_subtasks_generator():
    torch.manual_seed(0)
    decoder = D3Decoder(latent_dim=8, resolution=8, out_channels=1, channels=[8, 4], num_subtasks=2).eval()
    final_conv = decoder.generators[0].body[-2]
    assert isinstance(final_conv, torch.nn.Conv2d)
    with torch.no_grad():
        final_conv.weight.zero_()
        final_conv.bias.zero_()  # generator 0 now draws tanh(0) = 0 -> 0.5 everywhere, whatever the latent
    latents = torch.randn(6, 8)
    subtasks = torch.tensor([1, 0, 1, 1, 0, 0])
    with torch.no_grad():
        images = decoder(latents, subtasks)
        direct = (decoder.generators[1](latents[subtasks == 1]) + 1) / 2
    assert torch.equal(images[subtasks == 0], torch.full((3, 1, 8, 8), 0.5))
    assert torch.allclose(images[subtasks == 1], direct, atol=1e-6)
    assert (direct - 0.5).abs().max() > 0.01  # generator 1 is untouched, so the routing is visible
    with pytest.raises(ValueError, match="2 generators: pass subtask_ids"):
        decoder(latents)


def test_decoder_save_and_load(tmp_path):
    decoder = D3Decoder(latent_dim=8, resolution=8, out_channels=3, channels=[8, 4], num_subtasks=2)
    decoder.save_pretrained(tmp_path)
    loaded = D3Decoder.from_pretrained(tmp_path)
    assert loaded.config.num_subtasks == 2 and list(loaded.config.channels) == [8, 4]
    for (name, a), (_, b) in zip(decoder.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------------------
# GaussianLatentStore
# ----------------------------------------------------------------------------------------------------------


def test_store_layout_by_class_then_component():
    store = GaussianLatentStore(class_ids=[2, 5, 7], num_classes=9, latents_per_class=2, latent_dim=4,
                                subtask_sizes=[2, 1])
    assert store.num_components == 6 and store.mean.shape == store.logvar.shape == (6, 4)
    assert store.component_class.tolist() == [2, 2, 5, 5, 7, 7]
    assert store.component_subtask.tolist() == [0, 0, 0, 0, 1, 1]
    assert torch.equal(store.soft_labels, torch.eye(9)[[2, 2, 5, 5, 7, 7]])
    assert store.components_of([7, 2]).tolist() == [0, 1, 4, 5]
    assert store.components_of().tolist() == list(range(6))
    assert store.class_names == [str(i) for i in range(9)]
    with pytest.raises(ValueError, match=r"class_labels \[3\] are not in this store"):
        store.components_of([2, 3])


def test_class_ids_are_shown_with_their_runs_folded():
    from hf_d3.models.latent_store import folded_ids

    assert folded_ids(range(150, 200)) == "[150-199]"  # a subtask of Tiny ImageNet's 200 classes in 4
    assert folded_ids([0, 1, 2, 3, 5, 7, 8, 10, 11, 12]) == "[0-3, 5, 7, 8, 10-12]"
    assert folded_ids([2, 3]) == "[2, 3]" and folded_ids([4, 0]) == "[4, 0]"
    store = GaussianLatentStore(class_ids=list(range(200)), num_classes=201, latents_per_class=1, latent_dim=2)
    with pytest.raises(ValueError, match=r"class_labels \[200\] are not in this store; valid: \[0-199\]$"):
        store.components_of([200])


def test_store_samples_are_mean_plus_scaled_noise():
    torch.manual_seed(0)
    store = GaussianLatentStore(class_ids=[0, 1], num_classes=2, latents_per_class=3, latent_dim=5)
    components = torch.tensor([4, 1])
    latents, index = store.sample(components, num_samples_per_component=2, generator=torch.Generator().manual_seed(7))
    assert index.tolist() == [4, 1, 4, 1]
    eps = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    expected = store.mean[index] + torch.exp(store.logvar[index] / 2) * eps
    assert torch.allclose(latents, expected)

    with_means, index = store.sample(components, 2, include_means=True, generator=torch.Generator().manual_seed(7))
    assert index.tolist() == [4, 1, 4, 1, 4, 1]
    assert torch.equal(with_means[:2], store.mean[components]) and torch.allclose(with_means[2:], latents)


def test_store_log_variance_shared_by_consecutive_dimensions():
    # logvar_dim 2 of latent_dim 6: dimensions 0-2 share the first log-variance, 3-5 the second
    torch.manual_seed(0)
    store = GaussianLatentStore(class_ids=[0, 1], num_classes=2, latents_per_class=2, latent_dim=6, logvar_dim=2)
    assert store.logvar.shape == (4, 2) and store.mean.shape == (4, 6)
    components = torch.tensor([3, 0, 3])
    latents, index = store.sample(components, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    std = torch.exp(store.logvar[index] / 2)
    expected = store.mean[index] + torch.cat([std[:, :1].expand(3, 3), std[:, 1:].expand(3, 3)], dim=1) * eps
    assert torch.allclose(latents, expected)
    # the default is one log-variance per dimension, the paper's
    assert GaussianLatentStore(class_ids=[0], num_classes=1, latent_dim=6).logvar.shape == (1, 6)


@pytest.mark.parametrize("logvar_dim", [None, 2])
def test_store_fits_the_gaussians_of_given_latents(logvar_dim):
    store = GaussianLatentStore(class_ids=[0], num_classes=1, latents_per_class=1, latent_dim=4, logvar_dim=logvar_dim)
    # two latents: per-dimension variances 1, 0.25, 0 and 4; a variance below the minimum is raised to it
    store.fit_to(torch.tensor([[[1.0, 0.5, 3.0, -2.0], [-1.0, -0.5, 3.0, 2.0]]]), min_variance=0.01)
    assert torch.equal(store.mean, torch.tensor([[0.0, 0.0, 3.0, 0.0]]))
    expected = [1.0, 0.25, 0.01, 4.0] if logvar_dim is None else [0.625, 2.0]
    assert torch.allclose(store.logvar.exp(), torch.tensor([expected]))
    store.fit_to(torch.ones(1, 1, 4))  # one latent has no spread
    assert torch.allclose(store.logvar.exp(), torch.full_like(store.logvar, 0.01))


@pytest.mark.parametrize("kwargs, message", [
    ({"class_ids": []}, "must be non-empty"),
    ({"latent_dim": 6, "logvar_dim": 4}, "logvar_dim=4 must divide latent_dim=6"),
    ({"latent_dim": 6, "logvar_dim": 12}, "logvar_dim=12 must divide latent_dim=6"),
    ({"latent_dim": 6, "logvar_dim": 0}, "logvar_dim=0 must divide latent_dim=6"),
    ({"class_ids": [0, 3]}, r"ids in \[0, 3\)"),
    ({"latents_per_class": 0}, "latents_per_class=0"),
    ({"subtask_sizes": [1, 1]}, "sum to the 3 classes"),
    ({"class_names": ["a", "b"]}, "class_names has 2 names"),
])
def test_store_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianLatentStore(**{"class_ids": [0, 1, 2], "num_classes": 3, **kwargs})


@pytest.mark.parametrize("logvar_dim", [None, 2])
def test_store_save_and_load(tmp_path, logvar_dim):
    store = GaussianLatentStore(class_ids=[0, 1, 2], num_classes=3, latents_per_class=2, latent_dim=4,
                                class_names=["a", "b", "c"], subtask_sizes=[1, 2], logvar_dim=logvar_dim)
    with torch.no_grad():
        store.soft_labels.copy_(store.soft_labels.flip(1) * 0.5 + 0.1)
    store.save_pretrained(tmp_path)
    loaded = GaussianLatentStore.from_pretrained(tmp_path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.logvar.shape == (6, logvar_dim or 4)
    for (name, a), (_, b) in zip(store.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------------------
# Classifiers
# ----------------------------------------------------------------------------------------------------------


def test_convnet_features_are_the_penultimate_layer():
    torch.manual_seed(0)
    model = build_classifier("convnet", num_channels=1, image_size=16, num_labels=5, width=8, depth=2).eval()
    x, labels = torch.rand(3, 1, 16, 16), torch.tensor([0, 4, 2])
    out = model(x, labels=labels, output_hidden_states=True)
    (features,) = out.hidden_states
    assert features.shape == (3, 8 * 4 * 4)  # width x (16 / 2**depth)**2
    assert torch.allclose(model.classifier(features), out.logits, atol=1e-6)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert model(x).hidden_states is None
    # the model normalises its inputs with the config's mean / std
    manual = model.body((x - 0.5) / 0.5).flatten(1)
    assert torch.allclose(features, manual, atol=1e-6)


def test_resnet18_ap_shapes():
    torch.manual_seed(0)
    model = build_classifier("resnet18_ap", num_channels=3, image_size=16, num_labels=4, width=4).eval()
    out = model(torch.rand(2, 3, 16, 16), output_hidden_states=True)
    assert out.logits.shape == (2, 4) and out.hidden_states[-1].shape == (2, 8 * 4)
    assert torch.allclose(model.classifier(out.hidden_states[-1]), out.logits, atol=1e-6)
    # instance norm as GroupNorm, no BatchNorm: nothing but parameters is saved, so a flat parameter vector (an
    # expert trajectory) describes the whole network
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


def test_build_classifier_bad_input():
    with pytest.raises(ValueError, match="architecture 'vgg' is unknown"):
        build_classifier("vgg", 1, 28, 10)
    with pytest.raises(ValueError, match="below one pixel"):
        ConvNetForImageClassification(ConvNetConfig(image_size=8, depth=4, num_labels=2))


def test_auto_model_loads_both_classifiers_after_import_hf_d3(tmp_path):
    """In a fresh interpreter that imports nothing of hf_d3 but the package: the Auto classes know both models, and
    `output_hidden_states` returns the penultimate features."""
    for name, kwargs in (("convnet", {"width": 8, "depth": 2}), ("resnet18_ap", {"width": 4})):
        build_classifier(name, num_channels=1, image_size=16, num_labels=3, **kwargs).save_pretrained(tmp_path / name)
    script = textwrap.dedent("""
        import json, sys
        import torch
        import hf_d3  # noqa: F401  (registers the models with the Auto classes)
        from transformers import AutoModelForImageClassification
        result = {}
        for name in ("convnet", "resnet18_ap"):
            model = AutoModelForImageClassification.from_pretrained(sys.argv[1] + "/" + name).eval()
            out = model(torch.rand(2, 1, 16, 16), output_hidden_states=True)
            same = torch.allclose(model.classifier(out.hidden_states[-1]), out.logits, atol=1e-6, equal_nan=True)
            result[name] = [type(model).__name__, list(out.logits.shape), list(out.hidden_states[-1].shape), same]
        print(json.dumps(result))
    """)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["convnet"] == [ConvNetForImageClassification.__name__, [2, 3], [2, 8 * 4 * 4], True]
    assert loaded["resnet18_ap"] == [ResNet18APForImageClassification.__name__, [2, 3], [2, 8 * 4], True]


@pytest.mark.parametrize("architecture, kwargs", [("convnet", {"width": 8, "depth": 2}), ("resnet18_ap", {"width": 4})])
def test_from_pretrained_gives_the_same_predictions(tmp_path, architecture, kwargs):
    torch.manual_seed(0)
    model = build_classifier(architecture, num_channels=3, image_size=16, num_labels=3, image_mean=[0.1, 0.2, 0.3],
                             image_std=[0.4, 0.5, 0.6], **kwargs).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)
