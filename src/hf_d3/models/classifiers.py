"""ConvNet-Dd and ResNet18_AP, the experts, students and teachers of D3, as transformers models.

Both take images in [0, 1] and normalise them with the `image_mean` / `image_std` of their config, so
real data, decoded samples and augmentations all live in one pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput


class D3ClassifierConfig(PretrainedConfig):
    """Shared fields: input shape, label space and pixel normalisation."""

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 32,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.image_size = image_size
        self.image_mean = list(image_mean or [0.5] * num_channels)
        self.image_std = list(image_std or [0.5] * num_channels)


class ConvNetConfig(D3ClassifierConfig):
    """ConvNet-Dd: `depth` blocks of [Conv3x3 `width` channels, instance norm, ReLU, AvgPool 2]."""

    model_type = "d3_convnet"

    def __init__(self, width: int = 128, depth: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.depth = depth


class ResNet18APConfig(D3ClassifierConfig):
    """ResNet-18 with instance norm, a 3x3 stride-1 stem and average-pool downsampling."""

    model_type = "d3_resnet18_ap"

    def __init__(self, width: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.width = width


def _instance_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm with one group per channel is instance norm with a learnable affine, and has no
    # running buffers, so a flat parameter vector describes the whole network (trajectory matching).
    return nn.GroupNorm(channels, channels, affine=True)


class _D3Classifier(PreTrainedModel):
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("_mean", torch.tensor(config.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(config.image_std).view(1, -1, 1, 1), persistent=False)

    def _init_weights(self, module):
        # The torch defaults are the networks' reference initialisation. `from_pretrained` leaves the
        # non-persistent normalisation buffers empty (the model is built on the meta device): refill them.
        if isinstance(module, _D3Classifier):
            with torch.no_grad():
                module._mean.copy_(torch.tensor(module.config.image_mean).view(1, -1, 1, 1))
                module._std.copy_(torch.tensor(module.config.image_std).view(1, -1, 1, 1))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the flattened output of the last block."""
        return self.body((pixel_values - self._mean) / self._std).flatten(1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> ImageClassifierOutput:
        """Logits, the loss when `labels` are given, and the penultimate features as the last hidden state."""
        features = self.features(pixel_values)
        logits = self.classifier(features)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=(features,) if output_hidden_states else None
        )


class ConvNetForImageClassification(_D3Classifier):
    config_class = ConvNetConfig

    def __init__(self, config: ConvNetConfig):
        super().__init__(config)
        layers, channels, side = [], config.num_channels, config.image_size
        for _ in range(config.depth):
            layers += [nn.Conv2d(channels, config.width, 3, padding=1), _instance_norm(config.width),
                       nn.ReLU(), nn.AvgPool2d(2)]
            channels, side = config.width, side // 2
        if side < 1:
            raise ValueError(f"depth={config.depth} pools image_size={config.image_size} below one pixel")
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(config.width * side * side, config.num_labels)
        self.post_init()


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = _instance_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _instance_norm(c_out)
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.shortcut = nn.Identity()
        if downsample or c_in != c_out:
            self.shortcut = nn.Sequential(self.pool, nn.Conv2d(c_in, c_out, 1, bias=False), _instance_norm(c_out))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.pool(self.norm2(self.conv2(out)))
        return torch.relu(out + self.shortcut(x))


class ResNet18APForImageClassification(_D3Classifier):
    config_class = ResNet18APConfig

    def __init__(self, config: ResNet18APConfig):
        super().__init__(config)
        w = config.width
        layers = [nn.Conv2d(config.num_channels, w, 3, padding=1, bias=False), _instance_norm(w), nn.ReLU()]
        widths = [w, w, 2 * w, 2 * w, 4 * w, 4 * w, 8 * w, 8 * w]
        for i, (c_in, c_out) in enumerate(zip([w] + widths[:-1], widths)):
            layers.append(_BasicBlock(c_in, c_out, downsample=i in (2, 4, 6)))
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(8 * w, config.num_labels)
        self.post_init()


AutoConfig.register(ConvNetConfig.model_type, ConvNetConfig)
AutoConfig.register(ResNet18APConfig.model_type, ResNet18APConfig)
AutoModelForImageClassification.register(ConvNetConfig, ConvNetForImageClassification)
AutoModelForImageClassification.register(ResNet18APConfig, ResNet18APForImageClassification)

CLASSIFIERS = {"convnet": (ConvNetConfig, ConvNetForImageClassification),
               "resnet18_ap": (ResNet18APConfig, ResNet18APForImageClassification)}


def build_classifier(
    architecture: str, num_channels: int, image_size: int, num_labels: int, **config_kwargs
) -> _D3Classifier:
    """A freshly initialised "convnet" or "resnet18_ap" for the given input shape and label count."""
    if architecture not in CLASSIFIERS:
        raise ValueError(f"architecture {architecture!r} is unknown; valid: {sorted(CLASSIFIERS)}")
    config_cls, model_cls = CLASSIFIERS[architecture]
    config = config_cls(num_channels=num_channels, image_size=image_size, num_labels=num_labels, **config_kwargs)
    return model_cls(config)
