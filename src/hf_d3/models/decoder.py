"""The conv generator that turns D3 latents into images: the shared half of a D3 dataset."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..precision import at_least_float32, full_precision
from ..quantization import StoredInDtype, check_storage_dtype

# Channels of the paper's three decoders at 64x64 (docs/method.md, Reference settings of the paper): the first
# entry is the feature map the latent becomes, each next one an upsampling stage that doubles the side.
PRESETS: dict[str, dict] = {
    "small": {"latent_dim": 64, "channels": [256, 128, 64, 32, 32, 32], "latent_projection": True,
              "upsample_kernel_size": 4},
    "medium": {"latent_dim": 2048, "channels": [512, 256, 128, 64, 32, 32], "latent_projection": True,
               "upsample_kernel_size": 3},
    "large": {"latent_dim": 4096, "channels": [1024, 512, 256, 128, 64, 64], "latent_projection": False,
              "upsample_kernel_size": 3},
}


# The smallest side of the first feature map that a preset or the budget solver starts from.
MIN_START_SIDE = 2


def upsampling_stages(resolution: int, start_side: int = MIN_START_SIDE, max_stages: int | None = None) -> int:
    """The number of x2 upsampling stages (at most `max_stages`) that reaches `resolution` from an integer side of
    at least MIN_START_SIDE, the side closest to `start_side` in doublings (a tie takes fewer stages).

    The one rule for a decoder's stage count: a preset keeps as many of its stages as fit (`start_side` 2), the
    budget solver aims for a side of 8 (`hf_d3.sizing`)."""
    sides = {stages: resolution // 2**stages for stages in range(1, resolution.bit_length())
             if resolution % 2**stages == 0 and resolution // 2**stages >= MIN_START_SIDE
             and (max_stages is None or stages <= max_stages)}
    if not sides:
        raise ValueError(f"resolution={resolution} cannot be reached by doubling an integer side >= "
                         f"{MIN_START_SIDE}; use an even size of at least 4, such as 28, 32 or 64")
    return min(sides, key=lambda stages: (abs(math.log2(sides[stages] / start_side)), stages))


def preset_sizes(name: str, resolution: int, **overrides) -> dict:
    """The `D3Decoder` sizes (`latent_dim`, `channels`, `latent_projection`, `upsample_kernel_size`, then the
    `overrides`) of the paper's decoder `name` at `resolution`: its first (widest) stages, as many as fit."""
    if name not in PRESETS:
        raise ValueError(f"decoder preset {name!r} is unknown; valid: {sorted(PRESETS)}")
    sizes = dict(PRESETS[name])
    stages = upsampling_stages(resolution, max_stages=len(sizes["channels"]) - 1)
    sizes["channels"] = sizes["channels"][: stages + 1]
    if not sizes["latent_projection"]:  # the latent is reshaped to the first stage: its size is fixed
        side = resolution // 2**stages
        sizes["latent_dim"] = sizes["channels"][0] * side**2
        if overrides.get("latent_dim", sizes["latent_dim"]) != sizes["latent_dim"]:
            raise ValueError(f"decoder preset {name!r} reshapes its latents without a projection, so at resolution "
                             f"{resolution} latent_dim must be {sizes['channels'][0]} * {side}**2 = "
                             f"{sizes['latent_dim']}, not {overrides['latent_dim']}: set latent_dim to that")
    return {**sizes, **overrides}


UPSAMPLE_MODES = ("transpose", "nearest", "bilinear")


def _upsampling_layer(c_in: int, c_out: int, mode: str, kernel_size: int) -> nn.Module:
    if mode == "transpose":
        return nn.ConvTranspose2d(c_in, c_out, kernel_size, stride=2, padding=1,
                                  output_padding=1 if kernel_size == 3 else 0)
    # Resize then convolve: every output pixel sees the same number of inputs, so no checkerboard pattern.
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(c_in, c_out, 3, padding=1))


def start_side(latent_dim: int, resolution: int, out_channels: int, channels: Sequence[int],
               latent_projection: bool, upsample_kernel_size: int, upsample_mode: str) -> int:
    """The side of the first feature map of a `D3Decoder` of these sizes; raises ValueError, naming what would be
    valid, for sizes no D3Decoder can have."""
    channels = list(channels)
    stages = len(channels) - 1
    if out_channels not in (1, 3):
        raise ValueError(f"out_channels={out_channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    if upsample_kernel_size not in (3, 4):
        raise ValueError(f"upsample_kernel_size={upsample_kernel_size} must be 3 or 4")
    if upsample_mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample_mode={upsample_mode!r} is not valid; choose one of {list(UPSAMPLE_MODES)}")
    if stages < 1 or resolution % 2**stages or resolution // 2**stages < 1:
        valid = [s * 2**stages for s in range(2, 9)]
        raise ValueError(
            f"resolution={resolution} cannot be produced with {stages} x2 upsampling stages "
            f"(channels={channels}); with this many stages valid resolutions are {valid}, "
            "or change the number of channel entries"
        )
    start_size = resolution // 2**stages
    if not latent_projection and latent_dim != channels[0] * start_size**2:
        raise ValueError(
            f"latent_dim={latent_dim} must equal channels[0] * {start_size}**2 = "
            f"{channels[0] * start_size**2} when latent_projection is False"
        )
    return start_size


class _Generator(nn.Module):
    def __init__(self, latent_dim, out_channels, start_size, channels, latent_projection, kernel_size, mode):
        super().__init__()
        self.start_shape = (channels[0], start_size, start_size)
        feature_values = channels[0] * start_size**2
        self.project = nn.Linear(latent_dim, feature_values) if latent_projection else nn.Identity()
        layers = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [
                _upsampling_layer(c_in, c_out, mode, kernel_size),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2),
            ]
        layers += [nn.Conv2d(channels[-1], out_channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, latents):
        return self.body(self.project(latents).view(-1, *self.start_shape))


class D3Decoder(StoredInDtype, ModelMixin, ConfigMixin):
    """One conv generator per subtask; each latent is decoded by its subtask's generator.

    Output images are in [0, 1] (a rescaled tanh, so the whole pixel range is reachable); classifiers
    normalise their own inputs.

    Args:
        latent_dim: size of a latent.
        resolution: side of the square output image.
        out_channels: 1 (grayscale) or 3 (RGB).
        channels: channels of the first feature map, then of each x2 upsampling stage; the number of
            stages fixes the starting side, `resolution / 2**(len(channels) - 1)`, which must be an integer.
        latent_projection: map the latent through a Linear layer to the first feature map; without it
            the latent is reshaped, so `latent_dim` must equal `channels[0] * start_side**2`.
        upsample_kernel_size: 4 (padding 1) or 3 (padding 1, output padding 1); both double the side
            (transposed convolutions only).
        upsample_mode: "transpose" (the paper's transposed convolutions) or "nearest" / "bilinear"
            (resize, then a 3x3 convolution: no checkerboard artefacts, the same parameter count as kernel 3).
        num_subtasks: number of independent generators.
        storage_dtype: how `save_pretrained` stores the floating tensors (`hf_d3.quantization`): "float32" (as
            held), "float16", "bfloat16" or "int8" (a scale per output channel of each weight).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        latent_dim: int = 64,
        resolution: int = 32,
        out_channels: int = 3,
        channels: Sequence[int] = (256, 128, 64, 32, 32),
        latent_projection: bool = True,
        upsample_kernel_size: int = 4,
        num_subtasks: int = 1,
        upsample_mode: str = "transpose",
        storage_dtype: str = "float32",
    ):
        super().__init__()
        check_storage_dtype(storage_dtype)
        channels = list(channels)
        start_size = start_side(latent_dim, resolution, out_channels, channels, latent_projection,
                                upsample_kernel_size, upsample_mode)
        self.generators = nn.ModuleList(
            _Generator(latent_dim, out_channels, start_size, channels, latent_projection, upsample_kernel_size,
                       upsample_mode)
            for _ in range(num_subtasks)
        )

    @classmethod
    def from_preset(
        cls, name: str, resolution: int, out_channels: int, num_subtasks: int = 1, **overrides
    ) -> D3Decoder:
        """The paper's "small" (1 IPC), "medium" (2 IPC) or "large" (10 IPC) decoder at `resolution`.

        Smaller resolutions keep the preset's first (widest) stages and drop the rest.
        """
        return cls(resolution=resolution, out_channels=out_channels, num_subtasks=num_subtasks,
                   **preset_sizes(name, resolution, **overrides))

    def forward(self, latents: torch.Tensor, subtask_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Decode `latents` [N, latent_dim] to images [N, C, H, W] in [0, 1].

        Always in float32, even inside a bf16 autocast region: in bf16 the trajectory-matching gradients of the
        latents and decoder came out 14-18 % off (benchmarks/results/mtt_precision.json), and the decoder is a few
        per cent of an iteration's time."""
        with full_precision(latents.device):
            return self._decode(at_least_float32(latents), subtask_ids)

    def _decode(self, latents: torch.Tensor, subtask_ids: torch.Tensor | None) -> torch.Tensor:
        if subtask_ids is None:
            if len(self.generators) != 1:
                raise ValueError(f"this decoder has {len(self.generators)} generators: pass subtask_ids")
            return (self.generators[0](latents) + 1) / 2
        c, r = self.config.out_channels, self.config.resolution
        images = latents.new_empty(latents.shape[0], c, r, r)
        for subtask in subtask_ids.unique().tolist():
            picked = subtask_ids == subtask
            images[picked] = self.generators[subtask](latents[picked])
        return (images + 1) / 2
