"""Stage results keyed by their settings: the one place that says whether earlier work can be reused.

Every long piece of a run is a stage: an expert trajectory, the relabelling teacher, a distilled subtask, the
students' evaluation. A stage declares the settings its result depends on (the functions below); its folder,
`<stage_dir>/<kind>/<name>-<key>`, is named by a hash of them, as the image cache's is, and `stage.json`, written
last, says it is complete. So a rerun reuses a stage whose folder is complete and makes a new folder for any other
settings: nothing is refused, nothing of other settings is reused, and a complete stage never changes.

A subtask's progress (`iterations`, `max_distill_time_s`) is in its key too, but it is the one stage that can start
from another's work: a subtask of more iterations or time starts from the final checkpoint of a complete one that
differs only in those (`continuable_checkpoint`), since distilling further from a checkpoint gives what an
uninterrupted run gives. docs/method.md, Resuming.

Settings that change no result (where files go, logging, checkpoint frequency, compiling the inner step) are in
no key, so changing them reuses everything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import write_json
from .config import D3Config, DistillationConfig, RepresentationConfig
from .distill.checkpoint import PROGRESS_FILE, has_checkpoint
from .factories import net_kwargs

MARKER = "stage.json"
# Settings of the distillation objective that say how a subtask runs, not what it computes
UNKEYED_SETTINGS = ("checkpoint_every", "compile_inner_step")
# What chooses the sizes (a subtask's key holds the sizes chosen) and how the run stores its result at the end
BUDGET_SETTINGS = ("sizes", "storage_budget_ipc", "decoder_max_width", "budget_unit", "storage_dtype", "label_top_k")
# How far a subtask runs: in its key, and not in its lineage (`Stage.lineage`)
PROGRESS_SETTINGS = ("iterations", "max_distill_time_s")


@dataclass(frozen=True)
class Stage:
    """One stage result: its kind (the folder it is kept under), a readable name and the settings it depends on."""

    kind: str
    name: str
    settings: dict[str, Any]

    @property
    def key(self) -> str:
        """A hash of the kind and settings (JSON with sorted keys): equal settings, equal key, on any machine."""
        return _digest({"kind": self.kind, "settings": self.settings})

    @property
    def lineage(self) -> str:
        """A hash of the settings but their "progress": the stages one may continue from (`continuable_checkpoint`)."""
        return _digest({"kind": self.kind, "settings": {k: v for k, v in self.settings.items() if k != "progress"}})

    def folder(self, stage_dir: str | Path) -> Path:
        return Path(stage_dir) / self.kind / f"{self.name}-{self.key}"

    def is_complete(self, stage_dir: str | Path) -> bool:
        return (self.folder(stage_dir) / MARKER).is_file()

    def complete(self, stage_dir: str | Path, result: dict[str, Any] | None = None) -> None:
        """Mark the stage complete, last, with its settings and a small `result` record (`read_result`)."""
        write_json(self.folder(stage_dir) / MARKER, {"kind": self.kind, "name": self.name, "settings": self.settings,
                                                     "lineage": self.lineage, "result": result})

    def read_result(self, stage_dir: str | Path) -> Any:
        return json.loads((self.folder(stage_dir) / MARKER).read_text())["result"]

    def others(self, stage_dir: str | Path) -> list[Path]:
        """Folders of the same name kept for other settings (to say why this one is new)."""
        return sorted(p for p in (Path(stage_dir) / self.kind).glob(f"{self.name}-*")
                      if p != self.folder(stage_dir) and (p / MARKER).is_file())

    def relatives(self, stage_dir: str | Path) -> list[Path]:
        """Complete folders of the same name whose settings differ from these in their "progress" alone (complete:
        a folder still being written, or left by a killed or diverged run, holds no state to trust)."""
        return sorted(p for p in self.others(stage_dir)
                      if json.loads((p / MARKER).read_text()).get("lineage") == self.lineage)

    def describe_reuse(self, stage_dir: str | Path) -> str:
        """"reused" or why the stage is (re)done, for the log."""
        if self.is_complete(stage_dir):
            return f"reused from {self.folder(stage_dir)}"
        if others := self.others(stage_dir):
            return f"new settings, made in {self.folder(stage_dir)} ({len(others)} of other settings kept beside it)"
        return f"made in {self.folder(stage_dir)}"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# What each stage depends on
# ----------------------------------------------------------------------------------------------------------------


def subtask_seed(seed: int, subtask: int) -> int:
    """A subtask's seed (its real-image subset, its initial latents and draws) depends only on the run seed and its
    index, never on the number of processes."""
    return seed * 100_003 + subtask


def expert_seed(seed: int, subtask: int, expert: int) -> int:
    """Expert `expert` of `subtask`'s seed: distinct for every (subtask, expert) of a run with fewer than 10,007
    experts per subtask (`subtask_seed + expert` made expert 1 of subtask 0 a twin of expert 0 of subtask 1: the same
    initial weights and batch order). Subtask 0's experts keep the seeds they had."""
    return seed * 100_003 + subtask * 10_007 + expert


def _real_images(config: D3Config) -> dict[str, Any]:
    data = config.data
    return {"dataset": data.dataset, "train_split": data.train_split, "image_column": data.image_column,
            "label_column": data.label_column, "resolution": data.resolution, "channels": data.channels}


def _network(config: D3Config) -> dict[str, Any]:
    experts = config.experts
    return {"architecture": experts.architecture, **net_kwargs(experts.architecture, experts.net_width,
                                                               experts.net_depth)}


def _classifier_training(config: D3Config, precision: str) -> dict[str, Any]:
    experts = config.experts
    return {"lr": experts.expert_lr, "batch_size": experts.expert_batch_size, "augment": experts.expert_augment,
            "precision": precision}


def _subtask_data(config: D3Config, classes: list[int], subtask: int) -> dict[str, Any]:
    return {**_real_images(config), "classes": classes, "max_train_per_class": config.data.max_train_per_class,
            "subset_seed": subtask_seed(config.run.seed, subtask)}


def expert_stage(config: D3Config, classes: list[int], subtask: int, expert: int, precision: str) -> Stage:
    """Expert `expert` of `subtask`: trained on that subtask's real images (`max_train_per_class` of each class)."""
    return Stage("experts", f"subtask{subtask}-expert{expert}", {
        "data": _subtask_data(config, classes, subtask), "network": _network(config),
        "training": {**_classifier_training(config, precision), "epochs": config.experts.trajectory_epochs,
                     "seed": expert_seed(config.run.seed, subtask, expert)}})


def teacher_stage(config: D3Config, precision: str) -> Stage:
    """The global teacher: a network of the experts' kind trained on every training image of every class."""
    return Stage("teacher", "teacher", {
        "data": _real_images(config), "network": _network(config),
        "training": {**_classifier_training(config, precision), "epochs": config.relabel.teacher_epochs,
                     "momentum": 0.9, "seed": config.run.seed}})


def subtask_stage(config: D3Config, sizes: RepresentationConfig, class_names: list[str], classes: list[int],
                  subtask: int, experts: list[Stage], precision: str) -> Stage:
    """Subtask `subtask` distilled from `experts` into latents and a decoder of `sizes` (concrete)."""
    representation = {k: v for k, v in asdict(sizes).items() if k not in BUDGET_SETTINGS}
    objective = asdict(config.distillation)
    return Stage("subtasks", f"subtask{subtask}", {
        "data": _subtask_data(config, classes, subtask), "class_names": class_names,
        "experts": [expert.key for expert in experts], "representation": representation,
        "objective": {k: v for k, v in objective.items() if k not in (*UNKEYED_SETTINGS, *PROGRESS_SETTINGS)},
        "seed": subtask_seed(config.run.seed, subtask), "precision": precision,
        "progress": {k: objective[k] for k in PROGRESS_SETTINGS}})


def evaluation_stage(config: D3Config, subtasks: list[Stage], teacher: Stage | None, hard_label_weight: float,
                     precision: str) -> Stage:
    """The students trained on the relabelled pipeline of `subtasks` and tested on the real test split."""
    evaluation = config.evaluation
    settings = {
        "subtasks": [s.key for s in subtasks], "teacher": teacher.key if teacher else config.relabel.teacher,
        "relabel_temperature": config.relabel.relabel_temperature, "hard_label_weight": hard_label_weight,
        "test": {"dataset": config.data.dataset, "test_split": config.data.test_split,
                 "max_test_examples": config.data.max_test_examples},
        "students": {**asdict(evaluation), **net_kwargs(evaluation.eval_architecture, config.experts.net_width,
                                                        config.experts.net_depth)},
        "precision": precision}
    # The students learn from the pipeline as stored; float32 stores it as distilled, so it stays out of the key
    # (and the evaluations of runs from before `storage_dtype` stay valid).
    if config.representation.storage_dtype != "float32":
        settings["storage_dtype"] = config.representation.storage_dtype
    if config.representation.label_top_k is not None:  # likewise: the labels the students learn from
        settings["label_top_k"] = config.representation.label_top_k
    return Stage("evaluations", "evaluation", settings)


def continuable_checkpoint(stage: Stage, stage_dir: str | Path, distillation: DistillationConfig) -> Path | None:
    """The checkpoint a subtask `stage` that has none of its own can start from: the final one of most iterations
    among its complete relatives (`Stage.relatives`: the same subtask, other iterations or time) that ran no more
    iterations and no longer than `distillation` asks; None if there is none (it is then distilled afresh)."""
    usable = []
    for folder in stage.relatives(stage_dir):
        checkpoint = folder / "checkpoint"
        if not has_checkpoint(checkpoint):
            continue
        progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
        if progress["iterations_run"] <= distillation.iterations and (
                distillation.max_distill_time_s is None
                or progress["iterations_wall_time_s"] <= distillation.max_distill_time_s):
            usable.append((progress["iterations_run"], checkpoint))
    return max(usable)[1] if usable else None
