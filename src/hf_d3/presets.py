"""Defaults that fit the machine and the data, beneath what a config file and the command line set
(`hf_d3.config_parser`: preset < config file < command line).

A preset names the networks, batch sizes, steps and phases of a run:

- `cpu`: the offline demo's settings (recipes/configs/fashion_mnist.yaml) with a third of its warm start, batches
  of 32 for the experts so that small datasets give trajectories worth matching, and decoders at most 16 wide:
  narrow networks, one short expert, a warm start, a few iterations of 20 images per unrolled step, a short teacher
  and short students, so that a first result comes in minutes on one core, well under 3 GiB resident (BENCHMARKS.md,
  benchmarks/results/demo.json).
- `gpu`: the paper's protocol, as the shipped GPU configs share it (docs/method.md, Reference settings of the paper).
- `auto`: gpu where CUDA is available, else cpu.

Without a config file the preset is auto; a config file applies one only where it names it (`preset: cpu`), so a
file's run does not change with the machine unless it asks to. Where a preset applies, what the config leaves unset
comes from the data too: the resolution (the images' side, even, at most the preset's `MAX_RESOLUTION`) and channels (1
for a grayscale image, else 3) from the first training image, and with neither a budget nor a size,
`DEFAULT_BUDGET_IPC`, from which `hf_d3.sizing` chooses the sizes.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import PAPER_SIZES, DataConfig
from .data import image_shape_of

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "max_train_per_class": 1000, "net_width": 32, "num_experts": 1, "trajectory_epochs": 7,
        "expert_batch_size": 32,  # at 256, an expert on a few hundred images moves too little to match: NaN
        "init": "real", "init_steps": 300, "init_lr": 0.01, "iterations": 60, "syn_batch_size": 20,
        "lr_decoder": 1e-4, "lr_lr": 1e-5, "teacher_epochs": 3, "eval_steps": 400,
        "decoder_max_width": 16,  # decoding then costs about what the width-32 classifier does per image
    },
    "gpu": {
        "net_width": 128, "num_experts": 20, "trajectory_epochs": 30, "init": "random", "teacher_epochs": 30,
        "eval_steps": 20000,
    },
}
PRESET_NAMES = (*PRESETS, "auto")
# The largest side a preset takes from the images (larger ones are resized down to it): the paper's largest (64x64
# ImageNet) on a GPU; on a CPU 32, as the Tiny ImageNet CPU protocol, since a step's cost grows with the pixels
MAX_RESOLUTION = {"cpu": 32, "gpu": 64}
DEFAULT_BUDGET_IPC = 10


def resolve_preset(name: str) -> str:
    """The preset `name` stands for on this machine: "auto" is gpu where CUDA is available, else cpu."""
    if name not in PRESET_NAMES:
        raise ValueError(f"preset={name!r} is not a preset; valid: one of {list(PRESET_NAMES)}")
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def preset_defaults(name: str, data: DataConfig, given: set[str]) -> dict[str, tuple[Any, str]]:
    """The settings preset `name` (resolved by `resolve_preset`) gives a config that sets `given` (from its file or
    the command line) and reads `data`: `{setting: (value, where it comes from)}`, none of `given`."""
    name = resolve_preset(name)
    defaults = {key: (value, f"preset {name}") for key, value in PRESETS[name].items()}
    if not {"resolution", "channels"} <= given:
        side, channels = image_shape_of(data)
        # an odd side is rounded down: the decoder doubles an integer side to the resolution
        defaults |= {"resolution": (min(side - side % 2, MAX_RESOLUTION[name]), "the images"),
                     "channels": (channels, "the images")}
    if not {*PAPER_SIZES, "sizes", "storage_budget_ipc"} & given:
        defaults["storage_budget_ipc"] = (DEFAULT_BUDGET_IPC, "the default budget")
    return {key: value for key, value in defaults.items() if key not in given}
