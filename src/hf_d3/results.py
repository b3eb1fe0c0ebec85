"""What a run measures, as dataclasses: `metrics.json` is `RunMetrics.to_dict()`, and the keys a card reads are
the fields marked with a `card` description (`CARD_METRICS`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _card(description: str) -> dict:
    return {"card": description}


@dataclass
class DistillStats:
    """What `distill_subtask` did: the loss of every term per iteration, the learnt student lr, the iterations
    run (those before a resumed checkpoint included) and their wall time."""

    loss_history: dict[str, list[float]]
    syn_lr: float
    iterations_run: int
    iterations_wall_time_s: float


@dataclass
class SubtaskStats(DistillStats):
    """One finished subtask (its stage's result, `hf_d3.stages`): the distillation, the warm start before it, and its
    cost."""

    subtask: int
    classes: list[int]
    warm_start_mse: float | None
    warm_start_wall_time_s: float
    distill_wall_time_s: float
    peak_memory_bytes: int

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SubtaskStats:
        return cls(**values)


@dataclass
class ExpertWork:
    """The experts one rank trained, as (subtask, expert) pairs, and how long it took."""

    rank: int
    experts: list[tuple[int, int]]
    wall_time_s: float


@dataclass
class EvaluationResult:
    """Final-step test accuracy of students trained from scratch on a distilled set (never the best checkpoint)."""

    accuracy_mean: float = field(metadata=_card(
        "mean test accuracy of students trained on the distilled data, a fraction in [0, 1]"))
    accuracy_std: float = field(metadata=_card(
        "standard deviation of that accuracy over the evaluation runs, a fraction in [0, 1]"))
    accuracies: list[float]
    num_eval_runs: int = field(metadata=_card(
        "number of students trained (runs) behind the mean and standard deviation"))
    student_architecture: str = field(metadata=_card(
        'architecture of the evaluated students, e.g. "convnet" or "resnet18_ap"'))
    student_steps: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunMetrics(EvaluationResult):
    """Everything `run_distillation` measured (`<output_dir>/metrics.json`)."""

    teacher_accuracy: float  # soft labels are only as good as their teacher: its own score belongs beside the students'
    storage: dict[str, Any]
    planned_storage: dict[str, Any]
    distill_wall_time_s: float = field(metadata=_card("wall-clock time of the distillation, in seconds"))
    distill_peak_memory_bytes: int = field(metadata=_card(
        "peak memory of the distillation (accelerator memory if one was used), in bytes"))
    total_wall_time_s: float
    num_processes: int
    experts_per_rank: list[ExpertWork]
    subtasks: list[SubtaskStats]


#: Keys of a metrics dict that the pipeline card reads (all optional: a missing one shows as "not measured"); any
#: other key is listed on the card under "Other measurements".
CARD_METRICS: dict[str, str] = {
    f.name: f.metadata["card"] for f in dataclasses.fields(RunMetrics) if "card" in f.metadata
}
