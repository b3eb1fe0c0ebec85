"""What a run derives from its config and its data, computed once before any work (`make_plan`).

The user's `D3Config` is never replaced: the derived values (the subtask blocks, the concrete sizes, the storage they
take, the label weight, the precision) and the stages the run consists of (`hf_d3.stages`) live in a `RunPlan`,
which the stages receive beside the config group they use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import PRECISIONS, D3Config, RepresentationConfig
from .factories import planned_storage
from .sizing import resolve_sizes
from .stages import Stage, evaluation_stage, expert_stage, subtask_stage, teacher_stage
from .storage import StorageReport
from .teacher import hard_label_weight_for


@dataclass(frozen=True)
class RunPlan:
    """Everything a run derives, by the rules of `make_plan`.

    Args:
        class_names: the dataset's classes, in label order.
        subtasks: the classes of each subtask (contiguous blocks, `plan_subtasks`).
        sizes: the concrete sizes of the representation (`hf_d3.sizing.resolve_sizes`).
        storage: the storage those sizes take for these subtasks.
        hard_label_weight: the config's, else `hard_label_weight_for` the budget or the storage.
        precision: the mixed precision the run has ("no" or "bf16"), however it was given.
        stage_dir: where the stage results are kept (`stage_dir`, default `output_dir`).
        experts, subtask_stages, teacher, evaluation: the run's stages (`hf_d3.stages`); `teacher` is None when the
            config gives a teacher checkpoint.
    """

    class_names: list[str]
    subtasks: list[list[int]]
    sizes: RepresentationConfig
    storage: StorageReport
    hard_label_weight: float
    precision: str
    stage_dir: Path
    experts: list[list[Stage]]
    subtask_stages: list[Stage]
    teacher: Stage | None
    evaluation: Stage

    def run_settings(self, config: D3Config) -> dict[str, Any]:
        """The flat settings the run ran with (its `config.json`): the config's, with what was derived in place of
        what it left to the run (sizes, label weight, precision), so `recipes/evaluate.py` and the cards read them."""
        derived = {**dataclasses.asdict(self.sizes), "hard_label_weight": self.hard_label_weight,
                   "mixed_precision": self.precision}
        return {**config.to_dict(), **derived}


def plan_subtasks(class_ids: list[int], num_subtasks: int) -> list[list[int]]:
    """Contiguous blocks of classes, as the paper splits them; sizes differ by at most one."""
    if not 1 <= num_subtasks <= len(class_ids):
        raise ValueError(f"num_subtasks={num_subtasks} must be between 1 and the {len(class_ids)} classes")
    return [block.tolist() for block in np.array_split(np.asarray(class_ids), num_subtasks)]


def make_plan(config: D3Config, class_names: list[str], precision: str) -> RunPlan:
    """The plan of a run of `config` on a dataset of `class_names`, in `precision`. Fails, before any work, when the
    sizes do not fit the budget."""
    if precision not in PRECISIONS:  # a launch flag bypasses the config's own check
        raise ValueError(f"mixed_precision={precision!r} is not valid; valid: one of {list(PRECISIONS)}")
    subtasks = plan_subtasks(list(range(len(class_names))), config.run.num_subtasks)
    sized = resolve_sizes(config, len(class_names))
    storage = planned_storage(sized, subtasks)
    weight = config.relabel.hard_label_weight
    if weight is None:  # its rule is in IPC-equivalents of values
        sizes = config.representation
        budget = sizes.storage_budget_ipc if sizes.budget_unit == "values" else None
        weight = hard_label_weight_for(budget or storage.ipc_equivalent)
    experts = [[expert_stage(config, classes, k, i, precision) for i in range(config.experts.num_experts)]
               for k, classes in enumerate(subtasks)]
    subtask_stages = [subtask_stage(config, sized.representation, class_names, classes, k, experts[k], precision)
                      for k, classes in enumerate(subtasks)]
    teacher = None if config.relabel.teacher else teacher_stage(config, precision)
    return RunPlan(
        class_names=class_names, subtasks=subtasks, sizes=sized.representation, storage=storage,
        hard_label_weight=weight, precision=precision, stage_dir=Path(config.run.stage_dir or config.run.output_dir),
        experts=experts, subtask_stages=subtask_stages, teacher=teacher,
        evaluation=evaluation_stage(config, subtask_stages, teacher, weight, precision),
    )
