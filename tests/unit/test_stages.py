"""Stage results keyed by their settings (hf_d3.stages): what changes a key, what does not, and the marker."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_plan

from hf_d3.config import D3Config
from hf_d3.stages import Stage, continuable_checkpoint


@pytest.fixture
def plan_of(tiny_run):
    return lambda **settings: tiny_plan(tiny_run(**settings))


def keys(plan) -> dict[str, str]:
    return {"expert": plan.experts[0][0].key, "subtask": plan.subtask_stages[0].key, "teacher": plan.teacher.key,
            "evaluation": plan.evaluation.key}


@pytest.mark.parametrize("settings, changed", [
    ({"output_dir": "elsewhere", "stage_dir": "shared", "log_every": 1, "checkpoint_every": 1, "report_to": "none"},
     set()),
    ({"compile_inner_step": True}, set()),
    ({"storage_dtype": "int8"}, {"evaluation"}),  # stored at the end of the run: the students see it
    ({"storage_dtype": "float32"}, set()),  # the default, given
    ({"label_top_k": 2}, {"evaluation"}),  # relabelled at the end of the run, like the storage dtype
    ({"iterations": 500}, {"subtask", "evaluation"}),  # a subtask of more iterations: another stage, continued
    ({"max_distill_time_s": 60.0}, {"subtask", "evaluation"}),
    ({"expert_lr": 1}, {"expert", "subtask", "teacher", "evaluation"}),
    ({"eval_steps": 5, "eval_seeds": 2}, {"evaluation"}),
    ({"relabel_temperature": 2.0}, {"evaluation"}),
    ({"teacher_epochs": 3}, {"teacher", "evaluation"}),
    ({"latents_per_class": 3}, {"subtask", "evaluation"}),
    ({"lr_latents": 0.1}, {"subtask", "evaluation"}),
    ({"trajectory_epochs": 3}, {"expert", "subtask", "evaluation"}),
    ({"max_train_per_class": 10}, {"expert", "subtask", "evaluation"}),
    ({"expert_lr": 0.02}, {"expert", "subtask", "teacher", "evaluation"}),
    ({"expert_lr": 0.01}, set()),  # the default, given
    ({"net_width": 16}, {"expert", "subtask", "teacher", "evaluation"}),
    ({"seed": 1}, {"expert", "subtask", "teacher", "evaluation"}),
], ids=lambda value: ",".join(value) if isinstance(value, dict) else None)
def test_a_setting_changes_the_keys_of_the_stages_that_depend_on_it(plan_of, settings, changed):
    before, after = keys(plan_of()), keys(plan_of(**settings))
    assert {stage for stage in before if before[stage] != after[stage]} == changed


def test_a_given_teacher_replaces_the_teacher_stage(plan_of, tmp_path):
    plan = plan_of(teacher=str(tmp_path / "checkpoint"))
    assert plan.teacher is None and plan.evaluation.key != plan_of().evaluation.key


def test_experts_of_each_subtask_and_index_are_distinct_stages(plan_of):
    plan = plan_of(num_subtasks=2, num_experts=2)
    assert len({expert.key for experts in plan.experts for expert in experts}) == 4
    assert plan.subtask_stages[0].key != plan.subtask_stages[1].key


def test_a_stage_is_complete_once_marked_and_names_the_others_of_its_name(tmp_path):
    first, other = Stage("experts", "subtask0-expert0", {"lr": 0.01}), Stage("experts", "subtask0-expert0", {"lr": 1})
    assert first.key == Stage("experts", "subtask0-expert0", {"lr": 0.01}).key != other.key
    assert first.folder(tmp_path).name == f"subtask0-expert0-{first.key}"
    assert not first.is_complete(tmp_path) and "made in" in first.describe_reuse(tmp_path)
    first.complete(tmp_path, {"seconds": 3})
    assert first.is_complete(tmp_path) and first.read_result(tmp_path) == {"seconds": 3}
    assert other.others(tmp_path) == [first.folder(tmp_path)]
    assert "1 of other settings kept" in other.describe_reuse(tmp_path)
    assert Stage("experts", "subtask0-expert1", {}).others(tmp_path) == []  # another name is not another setting


def test_whole_numbers_of_float_settings_key_as_floats(plan_of):
    assert keys(plan_of(expert_lr=1)) == keys(plan_of(expert_lr=1.0))  # YAML reads `expert_lr: 1` as an int


def test_a_subtask_continues_from_a_relative_of_fewer_iterations_or_less_time(plan_of, tmp_path):
    """Relatives differ in their progress alone; only a checkpoint that ran no more than is asked can be continued."""
    short, long = plan_of(iterations=1).subtask_stages[0], plan_of(iterations=3).subtask_stages[0]
    timed = plan_of(iterations=3, max_distill_time_s=0.5).subtask_stages[0]
    other = plan_of(iterations=1, lr_latents=0.5).subtask_stages[0]
    assert short.key != long.key and short.lineage == long.lineage == timed.lineage != other.lineage
    for stage, iterations, seconds in ((short, 1, 0.1), (other, 1, 0.1)):
        (stage.folder(tmp_path) / "checkpoint").mkdir(parents=True)
        (stage.folder(tmp_path) / "checkpoint" / "progress.json").write_text(
            json.dumps({"iterations_run": iterations, "iterations_wall_time_s": seconds}))
    assert long.relatives(tmp_path) == []  # a checkpoint of an incomplete folder may be half copied or diverged
    for stage in (short, other):
        stage.complete(tmp_path)
    assert long.relatives(tmp_path) == [short.folder(tmp_path)]
    assert continuable_checkpoint(long, tmp_path, D3Config.from_dict({"iterations": 3}).distillation) \
        == short.folder(tmp_path) / "checkpoint"
    assert continuable_checkpoint(long, tmp_path, D3Config.from_dict({"iterations": 0}).distillation) is None
    assert continuable_checkpoint(timed, tmp_path, D3Config.from_dict(
        {"iterations": 3, "max_distill_time_s": 0.05}).distillation) is None  # it ran longer than asked
