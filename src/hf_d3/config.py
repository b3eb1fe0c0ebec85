"""The run configuration: settings grouped by concern, read from one flat YAML file with command-line overrides.

A YAML file and the command line name settings flat (`iterations: 600`, `--latent_dim 196`); every name belongs to
exactly one group, so `D3Config.from_dict` and `parse_config` know where each goes, and each part of the job
receives only the group it needs (`config.distillation`, `config.evaluation`, ...); `hf_d3.config_parser` reads
them from a YAML file and the command line. Each setting's constraint sits
beside it (`valid=`, checked when its group is made); checks that join settings of several fields are in
`D3Config.__post_init__` alone. The groups are frozen: what a run derives from them lives in its plan
(`hf_d3.run_plan`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from accelerate.utils import LoggerType

from .models.decoder import PRESETS, UPSAMPLE_MODES
from .quantization import STORAGE_DTYPES
from .validation import AboveZero, AtLeast, Between, HubRepoId, OneOf, check_fields, check_types, field_types, setting

ARCHITECTURES = ("convnet", "resnet18_ap")
PRECISIONS = ("no", "bf16")  # fp16 would need a gradient scaler


@dataclass(frozen=True)
class DataConfig:
    """The real dataset and how its images are read."""

    dataset: str = setting("builtin:fashion_mnist", help="Hub id, local folder or builtin:fashion_mnist")
    train_split: str = "train"
    test_split: str = "test"
    image_column: str | None = None
    label_column: str | None = None
    resolution: int = setting(28, valid=AtLeast(1))
    channels: int = setting(1, valid=OneOf((1, 3)))
    max_train_per_class: int | None = setting(None, valid=AtLeast(1), help=(
        "real images per class the experts, the warm start and the MMD draw from (a seeded subset); the teacher "
        "trains on every image"))
    max_test_examples: int | None = setting(None, valid=AtLeast(1))
    streaming: bool = setting(False, help="stream the splits into the image cache, rank by rank")

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives, its seed, its federated split and how it reports progress."""

    output_dir: str = "outputs/run"
    stage_dir: str | None = setting(None, help="where the stage results (experts, teacher, subtasks, evaluations) are "
                                    "kept, each in a folder keyed by its settings, so runs may share one; default: "
                                    "output_dir")
    seed: int = setting(0, valid=AtLeast(0))
    num_subtasks: int = setting(1, help="classes are split into this many contiguous blocks", valid=AtLeast(1))
    collective_timeout_s: int = setting(7200, help="longest wait for a peer process", valid=AtLeast(1))
    log_every: int = setting(10, help="iterations between two logs of the distillation losses", valid=AtLeast(1))
    report_to: str = setting("none", help='trackers for Accelerate\'s log_with, comma-separated: e.g. "tensorboard", '
                             '"wandb", "all" or "none"')
    mixed_precision: str | None = setting(None, valid=OneOf(PRECISIONS), help=(
        "no or bf16 (autocast for experts, MMD embedding, teacher and students; the decoder and the "
        "trajectory-matching unroll stay float32); default: what Accelerate is launched with, else no"))

    def __post_init__(self):
        check_fields(self)
        unknown = [name for name in self.trackers if name not in LoggerType.list()]  # what log_with accepts
        if unknown:
            raise ValueError(f"report_to={self.report_to!r}: unknown tracker(s) {unknown}; choose \"none\" or "
                             f"one or more (comma-separated) of {LoggerType.list()}")

    @property
    def trackers(self) -> list[str]:
        """`report_to` as the list Accelerate's `log_with` takes; empty for "none"."""
        return [] if self.report_to == "none" else [name.strip() for name in self.report_to.split(",")]


@dataclass(frozen=True)
class ExpertConfig:
    """The networks (experts, teacher, MMD embedding) and the expert trajectories."""

    architecture: str = setting("convnet", valid=OneOf(ARCHITECTURES))
    net_width: int = setting(128, help="ConvNet channels (ResNet-18 keeps its standard 64)", valid=AtLeast(1))
    net_depth: int = setting(3, help="ConvNet blocks", valid=AtLeast(1))
    num_experts: int = setting(2, valid=AtLeast(1))
    trajectory_epochs: int = setting(10, valid=AtLeast(1))
    expert_lr: float = setting(0.01, valid=AboveZero())
    expert_batch_size: int = setting(256, valid=AtLeast(1))
    expert_augment: bool = True

    def __post_init__(self):
        check_fields(self)


# The sizes of a representation, and the paper's "small" 1 IPC defaults (docs/method.md, Reference settings of the
# paper) that the unset ones take when the budget does not choose them.
PAPER_SIZES: dict[str, Any] = {
    "latents_per_class": 10, "latent_dim": 64, "logvar_dim": None, "decoder_preset": None,
    "decoder_channels": [256, 128, 64, 32, 32, 32], "decoder_latent_projection": True, "decoder_kernel_size": 4,
    "decoder_upsample": "transpose",
}


@dataclass(frozen=True)
class RepresentationConfig:
    """The sizes of the distilled dataset: Gaussians per class, latent shape, decoder, and the storage budget.

    With `storage_budget_ipc` and no size given (or `sizes: auto`), the sizes are chosen to use the budget once the
    class count is known (`hf_d3.sizing.resolve_sizes`); sizes given explicitly win over the chosen ones. Otherwise
    the unset sizes take the paper's defaults (`PAPER_SIZES`) and the budget is only checked.
    """

    sizes: str | None = setting(None, valid=OneOf(("auto", "explicit")), help=(
        "auto: choose the unset sizes from storage_budget_ipc (the default when a budget and no size is given); "
        "explicit: the given sizes, the paper's defaults for the rest"))
    latents_per_class: int | None = setting(None, valid=AtLeast(1))
    latent_dim: int | None = setting(None, valid=AtLeast(1))
    logvar_dim: int | None = setting(None, valid=AtLeast(1), help=(
        "log-variances per Gaussian, each shared by latent_dim / logvar_dim dimensions; default latent_dim"))
    decoder_preset: str | None = setting(None, valid=OneOf(tuple(PRESETS)),
                                         help="small, medium or large; else decoder_channels")
    decoder_channels: list[int] | None = setting(None, valid=AboveZero())
    decoder_latent_projection: bool | None = None
    decoder_kernel_size: int | None = None
    decoder_upsample: str | None = setting(None, valid=OneOf(UPSAMPLE_MODES), help=(
        "transpose (the paper's) or nearest / bilinear (resize + 3x3 conv, no checkerboard)"))
    storage_budget_ipc: float | None = setting(None, valid=AboveZero(), help=(
        "the storage budget in IPC-equivalents (of budget_unit): the sizes are chosen to use it, or checked against "
        "it"))
    budget_unit: str = setting("values", valid=OneOf(("values", "bytes")), help=(
        "values: the budget counts stored values against an image's values (the paper's); bytes: stored bytes "
        "(at storage_dtype) against a uint8 image's bytes"))
    storage_dtype: str = setting("float32", valid=OneOf(STORAGE_DTYPES), help=(
        "how the distilled pipeline is stored, quantised at the end of the run: float32, float16, bfloat16 or int8 "
        "(a float32 scale per channel)"))
    label_top_k: int | None = setting(None, valid=AtLeast(1), help=(
        "keep each soft label's k largest probabilities (stored as k values and k class ids); default: whole labels, "
        "num_classes values each, most of the storage at many classes"))
    decoder_max_width: int = setting(64, valid=AtLeast(8), help=(
        "the widest last decoder stage the budget may choose (earlier stages double it): decoding costs about "
        "width^2 per pixel, so a CPU run of many classes caps it"))

    def __post_init__(self):
        check_fields(self)
        # Unset sizes are settled here, once: the budget chooses them later, or the paper's defaults fill them now.
        if self.sizes is None:
            given = any(getattr(self, name) is not None for name in PAPER_SIZES)
            object.__setattr__(self, "sizes", "auto" if self.storage_budget_ipc is not None and not given
                               else "explicit")
        if self.sizes == "explicit":
            defaults = {**PAPER_SIZES, "latent_dim": PRESETS[self.decoder_preset]["latent_dim"]
                        if self.decoder_preset is not None else PAPER_SIZES["latent_dim"]}  # the preset's own
            for name, default in defaults.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)

    @property
    def chosen_by_budget(self) -> bool:
        """Whether the sizes still wait to be chosen from the budget (`hf_d3.sizing.resolve_sizes`)."""
        return self.sizes == "auto"


@dataclass(frozen=True)
class DistillationConfig:
    """The warm start and the objective (trajectory matching + MMD) of every subtask."""

    init: str = setting("random", valid=OneOf(("random", "real")),
                        help="random (the paper's) or real (fit real images first)")
    init_steps: int = setting(300, valid=AtLeast(0))
    init_lr: float = setting(1e-3, valid=AboveZero(), help="Adam learning rate of the warm start (init real)")
    init_images_per_component: int = setting(1, valid=AtLeast(1), help="real images each component fits (init real)")
    iterations: int = setting(1000, valid=AtLeast(0))
    max_distill_time_s: float | None = setting(None, valid=AtLeast(0), help="stop a subtask after this many seconds")
    mtt_weight: float = setting(1.0, valid=AtLeast(0))
    mmd_weight: float = setting(1.0, valid=AtLeast(0))
    syn_steps: int = setting(10, valid=AtLeast(1))
    expert_epochs: int = setting(2, valid=AtLeast(1))
    max_start_epoch: int = setting(5, valid=AtLeast(1))
    syn_batch_size: int | None = setting(None, valid=AtLeast(1), help="images per unrolled step; default all")
    lr_latents: float = setting(5e-3, valid=AtLeast(0))
    lr_decoder: float = setting(8e-5, valid=AtLeast(0))
    lr_lr: float = setting(1e-6, valid=AtLeast(0))
    syn_lr_init: float = setting(1e-2, valid=AboveZero())
    mmd_samples_per_class: int = setting(20, valid=AtLeast(1))
    mmd_bandwidths: list[float] = setting(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0], valid=AboveZero())
    checkpoint_every: int = setting(200, valid=AtLeast(1))
    compile_inner_step: bool = setting(False, help=(
        "torch.compile the inner SGD step of trajectory matching (about a minute to compile)"))

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class RelabelConfig:
    """The teacher that gives every Gaussian its soft label."""

    teacher: str | None = setting(None, help="image-classification checkpoint (path or Hub id)")
    teacher_epochs: int = setting(10, valid=AtLeast(0))
    relabel_temperature: float = setting(1.0, valid=AboveZero())
    hard_label_weight: float | None = setting(None, valid=Between(0, 1), help=(
        "weight of each Gaussian's class in its label (0: the teacher's softmax alone, 1: the class alone); unset: "
        "hf_d3.teacher.hard_label_weight_for"))

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class EvaluationConfig:
    """The students trained on the distilled data (docs/method.md, Evaluation protocol)."""

    eval_architecture: str = setting("convnet", valid=OneOf(ARCHITECTURES))
    eval_steps: int = setting(1000, valid=AtLeast(1))
    eval_batch_size: int = setting(256, valid=AtLeast(1))
    eval_lr: float = setting(0.01, valid=AboveZero())
    eval_seeds: int = setting(3, valid=AtLeast(1))
    eval_augment: bool = True

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class HubConfig:
    """Publishing the result."""

    push_to_hub: bool = False
    hub_model_id: str | None = setting(None, valid=HubRepoId())
    hub_dataset_id: str | None = setting(None, valid=HubRepoId(), help="also publish the materialised dataset")
    hub_private: bool = False

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class D3Config:
    """Every setting of a distillation run, by group. Defaults follow the paper's reference settings where they
    apply (docs/method.md); the YAML files in `recipes/configs` size them for a dataset and budget."""

    data: DataConfig = setting(default_factory=DataConfig)
    run: RunConfig = setting(default_factory=RunConfig)
    experts: ExpertConfig = setting(default_factory=ExpertConfig)
    representation: RepresentationConfig = setting(default_factory=RepresentationConfig)
    distillation: DistillationConfig = setting(default_factory=DistillationConfig)
    relabel: RelabelConfig = setting(default_factory=RelabelConfig)
    evaluation: EvaluationConfig = setting(default_factory=EvaluationConfig)
    hub: HubConfig = setting(default_factory=HubConfig)

    def __post_init__(self):
        """The checks that join settings of several fields."""
        objective, sizes = self.distillation, self.representation
        if objective.mtt_weight + objective.mmd_weight == 0:
            raise ValueError(f"mtt_weight={objective.mtt_weight}, mmd_weight={objective.mmd_weight}: not both 0; "
                             "valid: at least one of them above 0")
        needed = objective.max_start_epoch + objective.expert_epochs
        if objective.mtt_weight > 0 and needed > self.experts.trajectory_epochs:
            raise ValueError(
                f"trajectory_epochs={self.experts.trajectory_epochs} is too few for max_start_epoch="
                f"{objective.max_start_epoch} + expert_epochs={objective.expert_epochs}: train at least "
                f"{needed} epochs per expert, or lower max_start_epoch"
            )
        if sizes.sizes == "auto" and sizes.storage_budget_ipc is None:
            raise ValueError("sizes=auto chooses the sizes from the budget: give storage_budget_ipc too")
        if self.hub.push_to_hub and not self.hub.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. 'user/fashion-mnist-d3')")

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
