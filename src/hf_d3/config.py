"""The run configuration: settings grouped by concern, read from one flat YAML file with command-line overrides.

A YAML file and the command line name settings flat (`iterations: 600`, `--latent_dim 196`); every name belongs to
exactly one group, so `D3Config.from_dict` and `parse_config` know where each goes, and each part of the job
receives only the group it needs (`config.distillation`, `config.evaluation`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import LoggerType
from transformers import HfArgumentParser

from .models.decoder import PRESETS, UPSAMPLE_MODES
from .validation import check_ranges, check_types, field_types

ARCHITECTURES = ("convnet", "resnet18_ap")


def _check_choice(group: Any, name: str, valid: tuple) -> None:
    if getattr(group, name) not in valid:
        raise ValueError(f"{name}={getattr(group, name)!r} is not valid; choose one of {list(valid)}")


@dataclass
class DataConfig:
    """The real dataset and how its images are read."""

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
    # -- data path (issue 23)
    streaming: bool = field(default=False, metadata={"help": "stream the splits into the image cache, rank by rank"})

    def __post_init__(self):
        _check_choice(self, "channels", (1, 3))


@dataclass
class RunConfig:
    """Where the run lives, its seed, its federated split and how it reports progress."""

    output_dir: str = "outputs/run"
    stage_dir: str | None = field(default=None, metadata={
        "help": "where the stage results (experts, teacher, subtasks, evaluations) are kept, each in a folder keyed by "
                "its settings, so runs may share one; default: output_dir"})
    seed: int = 0
    num_subtasks: int = field(default=1, metadata={"help": "classes are split into this many contiguous blocks"})
    collective_timeout_s: int = field(default=7200, metadata={"help": "longest wait for a peer process"})
    log_every: int = field(default=10, metadata={"help": "iterations between two logs of the distillation losses"})
    report_to: str = field(default="none", metadata={
        "help": 'trackers for Accelerate\'s log_with, comma-separated: e.g. "tensorboard", "wandb", "all" or "none"'})
    # -- GPU-ready loop (issue 23): mixed precision
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no or bf16 (autocast for experts, MMD embedding, teacher and students; the decoder and the "
                "trajectory-matching unroll stay float32); default: what Accelerate is launched with, else no"})

    def __post_init__(self):
        if self.num_subtasks < 1:
            raise ValueError(f"num_subtasks={self.num_subtasks} must be >= 1")
        if self.log_every < 1:
            raise ValueError(f"log_every={self.log_every} must be >= 1")
        _check_choice(self, "mixed_precision", (None, "no", "bf16"))  # fp16 would need a gradient scaler
        unknown = [name for name in self.trackers if name not in LoggerType.list()]  # what log_with accepts
        if unknown:
            raise ValueError(f"report_to={self.report_to!r}: unknown tracker(s) {unknown}; choose \"none\" or "
                             f"one or more (comma-separated) of {LoggerType.list()}")

    @property
    def trackers(self) -> list[str]:
        """`report_to` as the list Accelerate's `log_with` takes; empty for "none"."""
        return [] if self.report_to == "none" else [name.strip() for name in self.report_to.split(",")]


@dataclass
class ExpertConfig:
    """The networks (experts, teacher, MMD embedding) and the expert trajectories."""

    architecture: str = "convnet"
    net_width: int = field(default=128, metadata={"help": "ConvNet channels (ResNet-18 keeps its standard 64)"})
    net_depth: int = field(default=3, metadata={"help": "ConvNet blocks"})
    num_experts: int = 2
    trajectory_epochs: int = 10
    expert_lr: float = 0.01
    expert_batch_size: int = 256
    expert_augment: bool = True

    def __post_init__(self):
        _check_choice(self, "architecture", ARCHITECTURES)
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")


# The sizes of a representation, and the paper's "small" 1 IPC defaults (docs/method.md, Reference settings of the
# paper) that the unset ones take when the budget does not choose them.
PAPER_SIZES: dict[str, Any] = {
    "latents_per_class": 10, "latent_dim": 64, "logvar_dim": None, "decoder_preset": None,
    "decoder_channels": [256, 128, 64, 32, 32, 32], "decoder_latent_projection": True, "decoder_kernel_size": 4,
    "decoder_upsample": "transpose",
}


@dataclass
class RepresentationConfig:
    """The sizes of the distilled dataset: Gaussians per class, latent shape, decoder, and the storage budget.

    With `storage_budget_ipc` and no size given (or `sizes: auto`), the sizes are chosen to use the budget once the
    class count is known (`hf_d3.sizing.resolve_sizes`); sizes given explicitly win over the chosen ones. Otherwise
    the unset sizes take the paper's defaults (`PAPER_SIZES`) and the budget is only checked.
    """

    sizes: str | None = field(default=None, metadata={
        "help": "auto: choose the unset sizes from storage_budget_ipc (the default when a budget and no size is "
                "given); explicit: the given sizes, the paper's defaults for the rest"})
    latents_per_class: int | None = None
    latent_dim: int | None = None
    logvar_dim: int | None = field(default=None, metadata={
        "help": "log-variances per Gaussian, each shared by latent_dim / logvar_dim dimensions; default latent_dim"})
    decoder_preset: str | None = field(default=None, metadata={"help": "small, medium or large; else decoder_channels"})
    decoder_channels: list[int] | None = None
    decoder_latent_projection: bool | None = None
    decoder_kernel_size: int | None = None
    decoder_upsample: str | None = field(default=None, metadata={
        "help": "transpose (the paper's) or nearest / bilinear (resize + 3x3 conv, no checkerboard)"})
    storage_budget_ipc: float | None = field(default=None, metadata={
        "help": "the storage budget in IPC-equivalents: the sizes are chosen to use it, or checked against it"})

    def __post_init__(self):
        _check_choice(self, "sizes", (None, "auto", "explicit"))
        _check_choice(self, "decoder_preset", (None, *PRESETS))
        if self.sizes is None:
            given = any(getattr(self, name) is not None for name in PAPER_SIZES)
            self.sizes = "auto" if self.storage_budget_ipc is not None and not given else "explicit"
        if self.sizes == "auto" and self.storage_budget_ipc is None:
            raise ValueError("sizes=auto chooses the sizes from the budget: give storage_budget_ipc too")
        if self.sizes == "explicit":
            if self.decoder_preset is not None and self.latent_dim is None:  # the preset's, not PAPER_SIZES'
                self.latent_dim = PRESETS[self.decoder_preset]["latent_dim"]
            for name, default in PAPER_SIZES.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        _check_choice(self, "decoder_upsample", (None, *UPSAMPLE_MODES))
        if self.latents_per_class is not None and self.latents_per_class < 1:
            raise ValueError(f"latents_per_class={self.latents_per_class} must be >= 1")

    @property
    def chosen_by_budget(self) -> bool:
        """Whether the sizes still wait to be chosen from the budget (`hf_d3.sizing.resolve_sizes`)."""
        return self.sizes == "auto"


@dataclass
class DistillationConfig:
    """The warm start and the objective (trajectory matching + MMD) of every subtask."""

    init: str = field(default="random", metadata={"help": "random (the paper's) or real (fit real images first)"})
    init_steps: int = 300
    init_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the warm start (init real)"})
    init_images_per_component: int = field(default=1, metadata={"help": "real images each component fits (init real)"})
    iterations: int = 1000
    max_distill_time_s: float | None = field(default=None, metadata={"help": "stop a subtask after this many seconds"})
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
    compile_inner_step: bool = field(default=False, metadata={
        "help": "torch.compile the inner SGD step of trajectory matching (about a minute to compile)"})

    def __post_init__(self):
        _check_choice(self, "init", ("random", "real"))
        if self.max_start_epoch < 1:
            raise ValueError(f"max_start_epoch={self.max_start_epoch} must be >= 1")
        if self.mtt_weight < 0 or self.mmd_weight < 0 or self.mtt_weight + self.mmd_weight == 0:
            raise ValueError(f"mtt_weight={self.mtt_weight}, mmd_weight={self.mmd_weight}: need >= 0, not both 0")


@dataclass
class RelabelConfig:
    """The teacher that gives every Gaussian its soft label."""

    teacher: str | None = field(default=None, metadata={"help": "image-classification checkpoint (path or Hub id)"})
    teacher_epochs: int = 10
    relabel_temperature: float = 1.0
    hard_label_weight: float | None = field(default=None, metadata={"help": "weight of each Gaussian's class in its "
        "label (0: the teacher's softmax alone, 1: the class alone); unset: hf_d3.teacher.hard_label_weight_for"})


@dataclass
class EvaluationConfig:
    """The students trained on the distilled data (docs/method.md, Evaluation protocol)."""

    eval_architecture: str = "convnet"
    eval_steps: int = 1000
    eval_batch_size: int = 256
    eval_lr: float = 0.01
    eval_seeds: int = 3
    eval_augment: bool = True

    def __post_init__(self):
        _check_choice(self, "eval_architecture", ARCHITECTURES)


@dataclass
class HubConfig:
    """Publishing the result."""

    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_dataset_id: str | None = field(default=None, metadata={"help": "also publish the materialised dataset"})
    hub_private: bool = False

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. 'user/fashion-mnist-d3')")


@dataclass
class D3Config:
    """Every setting of a distillation run, by group. Defaults follow the paper's reference settings where they
    apply (docs/method.md); the YAML files in `recipes/configs` size them for a dataset and budget."""

    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def __post_init__(self):
        check_ranges(self.to_dict())
        trajectory, objective = self.experts, self.distillation
        needed = objective.max_start_epoch + objective.expert_epochs
        if objective.mtt_weight > 0 and needed > trajectory.trajectory_epochs:
            raise ValueError(
                f"trajectory_epochs={trajectory.trajectory_epochs} is too few for max_start_epoch="
                f"{objective.max_start_epoch} + expert_epochs={objective.expert_epochs}: train at least "
                f"{needed} epochs per expert, or lower max_start_epoch"
            )

    @classmethod
    def groups(cls) -> dict[str, type]:
        return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> D3Config:
        """A config from flat settings (`{"iterations": 600, "latent_dim": 196}`); unknown keys are refused."""
        unknown = sorted(set(values) - set(FIELD_GROUP))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(FIELD_GROUP)}")
        check_types(values, FIELD_TYPES)
        return cls(**{name: group(**{k: v for k, v in values.items() if FIELD_GROUP[k] == name})
                      for name, group in cls.groups().items()})

    def to_dict(self) -> dict[str, Any]:
        """The flat settings, as in a YAML file (what `config.json` of a run holds)."""
        return {k: v for group in asdict(self).values() for k, v in group.items()}


# Every flat setting name -> the group it belongs to.
FIELD_GROUP: dict[str, str] = {f.name: name for name, group in D3Config.groups().items()
                               for f in fields(group)}
FIELD_TYPES: dict[str, Any] = field_types(D3Config.groups().values())


def parse_config(args: list[str] | None = None) -> D3Config:
    """Parse `--config file.yaml` and `--key value` overrides (the command line wins over the file)."""
    return parse_recipe_args(args)[0]


def parse_recipe_args(args: list[str] | None = None, *extra: type) -> tuple:
    """`parse_config` for a recipe with settings of its own: returns `(D3Config, *instances of extra)`.

    The extra dataclasses' fields are named flat beside the `D3Config` ones, in the YAML file and on the command
    line; `--config` may also be a finished run's `config.json` (JSON is YAML), so a recipe reruns a run's settings.
    """
    groups = D3Config.groups()
    parser = HfArgumentParser([*groups.values(), *extra], allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML file of D3Config settings (flat keys)")
    known, unknown = parser.parse_known_args(args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if known.config:
        extra_fields = {f.name for cls in extra for f in fields(cls)}
        parser.set_defaults(**load_yaml(known.config, extra_fields))
    *parsed, _ = parser.parse_args_into_dataclasses(args, look_for_args_file=False)
    config = D3Config(**dict(zip(groups, parsed[: len(groups)], strict=True)))
    return (config, *parsed[len(groups):])


def load_yaml(path: str | Path, extra_keys: set[str] = frozenset()) -> dict:
    """Read a flat YAML config, rejecting keys that are neither `D3Config` settings nor `extra_keys`."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a YAML {type(values).__name__}; valid: a mapping of settings, `name: value` "
                         "one a line")
    unknown = sorted(set(values) - set(FIELD_GROUP) - set(extra_keys))
    if unknown:
        raise ValueError(f"unknown config keys {unknown} in {path}; valid keys: {sorted({*FIELD_GROUP, *extra_keys})}")
    check_types(values, FIELD_TYPES, where=f" in {path}", from_text=True)
    return values
