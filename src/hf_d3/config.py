"""The run configuration: one dataclass, read from YAML with command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .models.decoder import UPSAMPLE_MODES


@dataclass
class D3Config:
    """Every setting of a distillation run. Defaults follow the paper's reference settings where they
    apply (DESIGN.md section 1); the YAML files in `recipes/configs` size them for a dataset and budget."""

    # Data
    dataset: str = field(default="builtin:fashion_mnist",
                         metadata={"help": "Hub id, local folder or builtin:fashion_mnist"})
    train_split: str = "train"
    test_split: str = "test"
    image_column: str | None = None
    label_column: str | None = None
    resolution: int = 28
    channels: int = 1
    max_train_per_class: int | None = field(default=None, metadata={"help": "subsample real data per class"})
    max_test_examples: int | None = None

    # Run
    output_dir: str = "outputs/run"
    seed: int = 0
    num_subtasks: int = field(default=1, metadata={"help": "classes are split into this many contiguous blocks"})
    collective_timeout_s: int = field(default=7200, metadata={"help": "longest wait for a peer process"})

    # Networks (experts, teacher, MMD embedding)
    architecture: str = "convnet"
    net_width: int = 128
    net_depth: int = 3

    # Expert trajectories
    num_experts: int = 2
    trajectory_epochs: int = 10
    expert_lr: float = 0.01
    expert_batch_size: int = 256
    expert_augment: bool = True

    # Representation
    latents_per_class: int = 10
    latent_dim: int = 64
    logvar_dim: int | None = field(default=None, metadata={
        "help": "log-variances per Gaussian, each shared by latent_dim / logvar_dim dimensions; default latent_dim"})
    decoder_preset: str | None = field(default=None, metadata={"help": "small, medium or large; else decoder_channels"})
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 32, 32])
    decoder_latent_projection: bool = True
    decoder_kernel_size: int = 4
    decoder_upsample: str = field(default="transpose", metadata={
        "help": "transpose (the paper's) or nearest / bilinear (resize + 3x3 conv, no checkerboard)"})
    storage_budget_ipc: float | None = field(default=None, metadata={"help": "fail if storage exceeds this IPC"})
    init: str = field(default="random", metadata={"help": "random (the paper's) or real (fit real images first)"})
    init_steps: int = 300
    init_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the warm start (init real)"})
    init_images_per_component: int = field(default=1, metadata={"help": "real images each component fits (init real)"})

    # Objective
    iterations: int = 1000
    max_distill_time_s: float | None = field(
        default=None, metadata={"help": "stop iterating a subtask after this many seconds"})
    mtt_weight: float = 1.0
    mmd_weight: float = 1.0
    syn_steps: int = 10
    expert_epochs: int = 2
    max_start_epoch: int = 5
    syn_batch_size: int | None = field(default=None, metadata={"help": "images per unrolled step; default all"})
    lr_latents: float = 5e-3
    lr_decoder: float = 8e-5
    lr_lr: float = 1e-6
    syn_lr_init: float = 1e-2
    mmd_samples_per_class: int = 20
    mmd_bandwidths: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0])
    checkpoint_every: int = 200

    # Relabelling
    teacher: str | None = field(default=None, metadata={"help": "image-classification checkpoint (path or Hub id)"})
    teacher_epochs: int = 10
    relabel_temperature: float = 1.0

    # Evaluation
    eval_architecture: str = "convnet"
    eval_steps: int = 1000
    eval_batch_size: int = 256
    eval_lr: float = 0.01
    eval_seeds: int = 3
    eval_augment: bool = True

    # Hub
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_dataset_id: str | None = field(default=None, metadata={"help": "also publish the materialised dataset"})
    hub_private: bool = False

    def __post_init__(self):
        choices = {"init": ("random", "real"), "architecture": ("convnet", "resnet18_ap"),
                   "eval_architecture": ("convnet", "resnet18_ap"), "channels": (1, 3),
                   "decoder_upsample": UPSAMPLE_MODES}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; choose one of {list(valid)}")
        if self.max_start_epoch + self.expert_epochs > self.trajectory_epochs and self.mtt_weight > 0:
            raise ValueError(
                f"trajectory_epochs={self.trajectory_epochs} is too few for max_start_epoch={self.max_start_epoch} "
                f"+ expert_epochs={self.expert_epochs}: train at least {self.max_start_epoch + self.expert_epochs} "
                "epochs per expert, or lower max_start_epoch"
            )
        if min(self.num_subtasks, self.num_experts, self.latents_per_class, self.max_start_epoch) < 1:
            raise ValueError("num_subtasks, num_experts, latents_per_class and max_start_epoch must all be >= 1")
        if self.mtt_weight < 0 or self.mmd_weight < 0 or self.mtt_weight + self.mmd_weight == 0:
            raise ValueError(f"mtt_weight={self.mtt_weight}, mmd_weight={self.mmd_weight}: need >= 0, not both 0")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. 'user/fashion-mnist-d3')")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_config(args: list[str] | None = None) -> D3Config:
    """Parse `--config file.yaml` and `--key value` overrides (the command line wins over the file)."""
    parser = HfArgumentParser(D3Config, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML file of D3Config fields")
    known, unknown = parser.parse_known_args(args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if known.config:
        parser.set_defaults(**load_yaml(known.config))
    config, _ = parser.parse_args_into_dataclasses(args, look_for_args_file=False)
    return config


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config, rejecting keys that are not `D3Config` fields."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    valid = {f.name for f in dataclasses.fields(D3Config)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown config keys {unknown} in {path}; valid keys: {sorted(valid)}")
    return values
