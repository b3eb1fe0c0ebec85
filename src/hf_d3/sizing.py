"""Sizes of a D3 representation chosen from a storage budget (`storage_budget_ipc` with the sizes unset).

Everything is counted by `hf_d3.storage`, from the sizes alone, so solving for 1,000 classes at 64x64 allocates
nothing: the decoder's parameters and buffers (K generators for K subtasks), every Gaussian's mean and
log-variances, and per component its soft label, class id and subtask id.

The shape is the one that won the CPU comparisons (benchmarks/results/compare_methods.json and ablations.json):
a spatial latent, a `C x s x s` feature map (`decoder_latent_projection: False`, `latent_dim = C * s * s`), one
log-variance per latent channel (`logvar_dim = C`, which fits twice the Gaussians of a variance per value), and a
small all-conv decoder with nearest-neighbour upsampling. The rule for what is left:

- **Stages**: the start side `s` closest to 8 that the resolution doubles from (28 -> 7, 32 -> 8, 64 -> 8, by the
  decoder's rule, `hf_d3.models.decoder.upsampling_stages`): the measured configs use 7 and 8, and a fixed side
  keeps a latent channel meaning the same at every resolution.
- **Latent channels C**, a power of two near a target that grows like sqrt(budget): a Gaussian's mean holds 1/4
  of a grayscale image or 1/6 of an RGB one at 10 IPC-equivalent. This reproduces the four measured optima
  (4 x 7 x 7 and 8 x 7 x 7 on Fashion-MNIST at 10 and 50, `fashion_mnist*.yaml`; 8 x 8 x 8 and 16 x 8 x 8 on
  CIFAR-10, `cifar10_ipc*.yaml`): both datasets doubled their best latent from 10 to 50, so a budget's growth
  goes about evenly to more Gaussians and to larger ones; colour wants fewer values per Gaussian (its channels
  are correlated). Only when no power of two fills the budget (a soft label dearer than the latent, as with
  1,000 classes at 32 x 32 x 1) may C be any integer.
- **Decoder widths** double towards the latent (`[..., 4w, 2w, w]`, as in the paper's decoders), w a multiple of
  4 in [8, 64]. All K generators together target 0.4 / sqrt(budget) of the budget, at most 1/2: about 13 % at 10
  (between the measured winners' 8 and 14 %), 6 % at 50, 28-40 % at 1-2 where ten classes cannot amortise a
  decoder (the paper's own 1 IPC decoders take a similar share, docs/method.md, Reference settings of the paper).
  w >= 8 is a floor; w <= 64 (`decoder_max_width`) caps the cost of decoding when many classes share a decoder:
  decoding costs about w^2 per pixel, so a CPU protocol of many classes caps it lower (tinyimagenet_cpu.yaml).
- **Gaussians per class M**: as many as the rest of the budget allows, at least 1.

A budget in bytes (`budget_unit: bytes`) counts the bytes stored at `storage_dtype` against a uint8 image's bytes
(`hf_d3.storage`), so an int8 D3 gets about four times the values of a float32 one; the targets above are then
those of the budget in values that many bytes hold (`bytes / VALUE_BYTES[storage_dtype]`).

Among all (C, w) whose largest M fits and fills at least 90 % of the budget, the solver takes the one closest to
the two targets, counted in doublings (`|log2(C / C_target)| + |log2(D / D_target)| / 2`: quadrupling the
decoder's values is about one doubling of its width); only when none fills 90 % (a budget just above the smallest
that works) it takes the fullest. Sizes given explicitly in a config win over these (`resolve_sizes`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .config import PAPER_SIZES, D3Config, RepresentationConfig
from .factories import build_decoder
from .models.decoder import upsampling_stages
from .models.latent_store import check_label_top_k
from .quantization import VALUE_BYTES
from .storage import StorageReport, component_bytes, component_values, decoder_bytes, decoder_values, storage_report

# Fraction of one image's values that a Gaussian's mean holds at 10 IPC-equivalent, by image channels:
# 4 x 7 x 7 of 28 x 28 (Fashion-MNIST) and 8 x 8 x 8 of 3 x 32 x 32 (CIFAR-10), the measured optima.
LATENT_FRACTION_AT_10_IPC: dict[int, float] = {1: 1 / 4, 3: 1 / 6}
# The decoder's target share of the budget is DECODER_SHARE_AT_1_IPC / sqrt(budget), at most MAX_DECODER_SHARE.
DECODER_SHARE_AT_1_IPC = 0.4
MAX_DECODER_SHARE = 0.5
# Width of the decoder's last stage (earlier stages double it); the step keeps the decoder share fine-grained.
MIN_DECODER_WIDTH = 8
MAX_DECODER_WIDTH = 64
DECODER_WIDTH_STEP = 4
# Side of the latent feature map the stage count aims for (the measured configs use 7 and 8).
TARGET_START_SIDE = 8
# The solver fills at least this fraction of the budget whenever some size does.
MIN_FILL = 0.9


@dataclass
class RepresentationSizes:
    """The sizes of a D3 representation, with the names of `hf_d3.config` (see `to_config`).

    Args:
        latents_per_class: Gaussians per class (M).
        latent_dim: values of a Gaussian's mean; without a projection `decoder_channels[0] * side**2`.
        logvar_dim: log-variances per Gaussian (it must divide `latent_dim`).
        decoder_channels: channels of the latent feature map, then of each x2 upsampling stage.
        decoder_latent_projection: map the latent through a Linear layer (False: the latent is reshaped).
        decoder_upsample: "nearest" or "bilinear" (a resize then a 3x3 convolution).
    """

    latents_per_class: int
    latent_dim: int
    logvar_dim: int
    decoder_channels: list[int] = field(default_factory=list)
    decoder_latent_projection: bool = False
    decoder_upsample: str = "nearest"

    def to_config(self) -> dict:
        """The flat config settings these sizes are (`latents_per_class: 31`, `decoder_channels: [4, 32, 32]` ...)."""
        return asdict(self)

    def storage(self, num_classes: int, resolution: int, channels: int, num_subtasks: int = 1,
                storage_dtype: str = "float32", label_top_k: int | None = None) -> StorageReport:
        """The storage these sizes take for `num_classes` classes of `channels x resolution x resolution` images
        split into `num_subtasks` subtasks (one decoder generator each), stored in `storage_dtype`, each soft label
        whole or its `label_top_k` largest probabilities."""
        store = {"class_ids": list(range(num_classes)), "num_classes": num_classes, "latent_dim": self.latent_dim,
                 "latents_per_class": self.latents_per_class, "logvar_dim": self.logvar_dim,
                 "storage_dtype": storage_dtype, "label_top_k": label_top_k}
        decoder = _decoder_arguments(self.decoder_channels, self.latent_dim, self.decoder_latent_projection,
                                     self.decoder_upsample, resolution, channels, num_subtasks)
        return storage_report(store, {**decoder, "storage_dtype": storage_dtype})


def _decoder_arguments(decoder_channels: list[int], latent_dim: int, latent_projection: bool, upsample: str,
                       resolution: int, channels: int, num_subtasks: int) -> dict:
    """The `D3Decoder` arguments of these sizes (the paper's kernel size, which resize upsampling does not use)."""
    return {"latent_dim": latent_dim, "resolution": resolution, "out_channels": channels, "channels": decoder_channels,
            "latent_projection": latent_projection, "upsample_kernel_size": PAPER_SIZES["decoder_kernel_size"],
            "upsample_mode": upsample, "num_subtasks": num_subtasks}


def decoder_widths(last_width: int, stages: int) -> list[int]:
    """Stage widths that double towards the latent and end at `last_width`: 3 stages of 16 -> [64, 32, 16]."""
    return [last_width * 2 ** (stages - 1 - i) for i in range(stages)]


def _max_total(storage_budget_ipc: float, values_per_class: int) -> int:
    """The most values (or bytes) whose IPC-equivalent, computed as storage_report computes it, is within the budget."""
    total = math.floor(storage_budget_ipc * values_per_class)
    while total / values_per_class > storage_budget_ipc:  # floating point can put the floor one over or under
        total -= 1
    while (total + 1) / values_per_class <= storage_budget_ipc:
        total += 1
    return total


def _budget_text(values: int, values_per_class: int) -> str:
    """The smallest round budget, shown to 2 significant figures, that holds `values` stored values (or bytes)."""
    needed = values / values_per_class
    step = 10.0 ** (math.floor(math.log10(needed)) - 1)
    units = math.ceil(needed / step)
    while True:
        text = f"{units * step:.{max(0, -round(math.log10(step)))}f}"
        if _max_total(float(text), values_per_class) >= values:
            return text
        units += 1


def _check_inputs(storage_budget_ipc: float, num_classes: int, resolution: int, channels: int,
                  num_subtasks: int, storage_dtype: str, budget_unit: str, label_top_k: int | None) -> None:
    if not (isinstance(storage_budget_ipc, int | float) and math.isfinite(storage_budget_ipc)
            and storage_budget_ipc > 0):
        raise ValueError(f"storage_budget_ipc={storage_budget_ipc!r} must be a positive number of IPC-equivalents")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    if channels not in LATENT_FRACTION_AT_10_IPC:
        raise ValueError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    if not 1 <= num_subtasks <= num_classes:
        raise ValueError(f"num_subtasks={num_subtasks} must be between 1 and the {num_classes} classes")
    if storage_dtype not in VALUE_BYTES:
        raise ValueError(f"storage_dtype={storage_dtype!r} is not valid; choose one of {list(VALUE_BYTES)}")
    if budget_unit not in ("values", "bytes"):
        raise ValueError(f"budget_unit={budget_unit!r} is not valid; choose values or bytes")
    check_label_top_k(label_top_k, num_classes)


def solve_sizes(storage_budget_ipc: float, num_classes: int, resolution: int, channels: int,
                num_subtasks: int = 1, storage_dtype: str = "float32", budget_unit: str = "values",
                max_decoder_width: int = MAX_DECODER_WIDTH, label_top_k: int | None = None) -> RepresentationSizes:
    """Sizes that use the storage budget by the rule of this module's docstring, counted in `budget_unit`
    ("values", or "bytes" stored in `storage_dtype`), the decoder's last stage at most `max_decoder_width` wide
    (`decoder_max_width`), each soft label whole or its `label_top_k` largest probabilities.

    Deterministic and pure; the result never exceeds `storage_budget_ipc` and fills at least 90 % of it
    whenever any size can. Raises ValueError, naming the smallest budget that works, when even one Gaussian
    of one latent channel per class and the narrowest decoder do not fit.
    """
    _check_inputs(storage_budget_ipc, num_classes, resolution, channels, num_subtasks, storage_dtype, budget_unit,
                  label_top_k)
    in_bytes = budget_unit == "bytes"
    stages = upsampling_stages(resolution, TARGET_START_SIDE)
    side = resolution // 2**stages
    values_per_image = channels * resolution**2  # a uint8 image's bytes too
    values_per_class = num_classes * values_per_image  # storage_report's IPC divisor (classes x image values)
    max_total = _max_total(storage_budget_ipc, values_per_class)
    budget_values = storage_budget_ipc * values_per_class  # in budget_unit
    values_ipc = storage_budget_ipc / VALUE_BYTES[storage_dtype] if in_bytes else storage_budget_ipc

    latent_target = values_per_image * LATENT_FRACTION_AT_10_IPC[channels] * math.sqrt(values_ipc / 10)
    channel_target = latent_target / side**2
    decoder_share = min(MAX_DECODER_SHARE, DECODER_SHARE_AT_1_IPC / math.sqrt(values_ipc))
    decoder_target = decoder_share * budget_values  # all K generators together

    def gaussian_values(latent_channels: int) -> int:
        sizes = (latent_channels * side**2, latent_channels, num_classes)
        return sum(component_bytes(*sizes, storage_dtype, label_top_k=label_top_k) if in_bytes
                   else component_values(*sizes, label_top_k))

    def decoder_size(latent_channels: int, width: int) -> int:
        decoder = _decoder_arguments([latent_channels, *decoder_widths(width, stages)], latent_channels * side**2,
                                     False, "nearest", resolution, channels, num_subtasks)
        return decoder_bytes(decoder, storage_dtype) if in_bytes else sum(decoder_values(decoder))

    smallest = decoder_size(1, MIN_DECODER_WIDTH) + num_classes * gaussian_values(1)
    if smallest > max_total:
        raise ValueError(
            f"storage_budget_ipc={storage_budget_ipc} is too small for {num_classes} classes at "
            f"{resolution}x{resolution}x{channels} with {num_subtasks} subtask(s): the smallest budget that works "
            f"is {_budget_text(smallest, values_per_class)} IPC-equivalent ({smallest:,} {budget_unit}: one "
            f"Gaussian of 1 x {side} x {side} per class with its soft label "
            f"({num_classes if label_top_k is None else label_top_k} of {num_classes} probabilities), and "
            f"{num_subtasks} decoder(s) of width {decoder_widths(MIN_DECODER_WIDTH, stages)})"
        )

    def best_of(channel_counts) -> tuple[tuple, tuple[int, int, int]]:
        """The best (key, (latent channels, width, Gaussians per class)) of these channel counts."""
        best_key, best = None, None
        for latent_channels in channel_counts:
            per_class = gaussian_values(latent_channels)
            for width in range(MIN_DECODER_WIDTH, max_decoder_width + 1, DECODER_WIDTH_STEP):
                decoder = decoder_size(latent_channels, width)
                latents_per_class = (max_total - decoder) // (num_classes * per_class)
                if latents_per_class < 1:
                    break  # wider decoders only leave less room
                total = decoder + num_classes * latents_per_class * per_class
                if total >= MIN_FILL * budget_values:  # by distance to the targets, in doublings
                    distance = (abs(math.log2(latent_channels / channel_target))
                                + abs(math.log2(decoder / decoder_target)) / 2)
                    key = (0, distance, -total, latent_channels, width)
                else:  # used only when no candidate fills the budget: the fullest
                    key = (1, -total, latent_channels, width)
                if best_key is None or key < best_key:
                    best_key, best = key, (latent_channels, width, latents_per_class)
        return best_key, best  # never empty: the smallest size fits (checked above)

    # A Gaussian's mean larger than the image it stands for would store more than the image itself.
    max_channels = values_per_image // side**2
    powers_of_two = [2**i for i in range(max_channels.bit_length()) if 2**i <= max_channels]
    best_key, best = best_of(powers_of_two)
    if best_key[0]:
        # No power of two fills the budget (a soft label costing more than the latent, as with 1,000 classes
        # at 32x32x1): any channel count, which gives a Gaussian's size a finer step.
        best_key, best = best_of(range(1, max_channels + 1))
    latent_channels, width, latents_per_class = best
    return RepresentationSizes(
        latents_per_class=latents_per_class,
        latent_dim=latent_channels * side**2,
        logvar_dim=latent_channels,
        decoder_channels=[latent_channels, *decoder_widths(width, stages)],
        decoder_latent_projection=False,
        decoder_upsample="nearest",
    )


def resolve_sizes(config: D3Config, num_classes: int) -> D3Config:
    """`config` with concrete sizes: when the budget chooses them (`RepresentationConfig.chosen_by_budget`), those
    of `solve_sizes` for `num_classes`, with every size the config gives explicitly in their place; otherwise
    `config` itself."""
    sizes = config.representation
    if not sizes.chosen_by_budget:
        return config
    solved = solve_sizes(sizes.storage_budget_ipc, num_classes, config.data.resolution, config.data.channels,
                         config.run.num_subtasks, sizes.storage_dtype, sizes.budget_unit,
                         sizes.decoder_max_width, sizes.label_top_k).to_config()
    given = {name: value for name, value in asdict(sizes).items() if name in PAPER_SIZES and value is not None}
    chosen = RepresentationConfig(**{**asdict(sizes), **solved, **given, "sizes": "explicit"})
    try:  # a size given beside the chosen ones may not fit them (a latent_dim the chosen decoder cannot reshape)
        build_decoder(chosen, config.data)
    except ValueError as error:
        raise ValueError(f"the sizes given with sizes=auto ({given}) do not fit those the budget chose ({solved}): "
                         f"{error}; give these sizes together, or none of them") from None
    return replace(config, representation=chosen)
