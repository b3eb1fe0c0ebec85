"""A whole (tiny) `run_distillation` on a real local dataset, in one process: a failed run leaves no results, a
rerun reuses its stages by key, the evaluate recipe trains the run's own students, and a teacher checkpoint
labels the components."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import PIL.Image
import pytest
import torch
from conftest import TINY_RUN, make_net, stage_folders, tiny_plan
from torch import nn
from transformers import AutoModelForImageClassification

from hf_d3 import D3Pipeline
from hf_d3.config import D3Config
from hf_d3.data import load_image_dataset, load_images
from hf_d3.evaluation import accuracy
from hf_d3.run import run_distillation
from hf_d3.teacher import hard_label_weight_for


@pytest.fixture(scope="module")
def bad_teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher10")
    make_net(num_labels=10).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(fmnist4_folder, bad_teacher, tmp_path_factory):
    """A run that fails at relabelling (its teacher knows 10 classes, the data 4), then the same output_dir rerun
    without that teacher. Returns (output_dir, the first error, files after the failure, mtimes, the rerun).

    A run checks its teacher before any work (tests/integration/test_bad_input.py): that check is skipped here, so the
    teacher fails where a problem only its weights show would, at relabelling, after the subtasks are finished."""
    output_dir = tmp_path_factory.mktemp("run")
    settings = {"dataset": str(fmnist4_folder), "output_dir": str(output_dir), **TINY_RUN}
    with pytest.raises(ValueError) as error, pytest.MonkeyPatch.context() as patch:
        patch.setattr("hf_d3.preflight.check_teacher", lambda *args: None)
        run_distillation(D3Config.from_dict({**settings, "teacher": str(bad_teacher)}))
    after_failure = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*"))
    (subtask,), (expert,) = stage_folders(output_dir, "subtasks"), stage_folders(output_dir, "experts")
    mtimes = {p: p.stat().st_mtime_ns for p in (subtask / "stage.json", expert / "trajectory.safetensors")}
    result = run_distillation(D3Config.from_dict(settings))
    return output_dir, error.value, after_failure, mtimes, result


def test_a_failed_run_leaves_no_results(runs):
    output_dir, error, after_failure, _, _ = runs
    assert "the teacher predicts 10 classes but the dataset has 4" in str(error)
    for name in ("metrics.json", "samples.png", "config.json"):
        assert name not in after_failure, name
    assert not any(p == "pipeline" or p.startswith("pipeline") for p in after_failure)
    (subtask,) = stage_folders(output_dir, "subtasks")
    assert f"{subtask.relative_to(output_dir)}/stage.json" in after_failure  # the finished subtask is kept


def test_the_rerun_reuses_the_finished_subtask(runs):
    _, _, _, mtimes, _ = runs
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_end_to_end_run(runs, fmnist4_folder):
    output_dir, _, _, _, result = runs
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 1 and metrics["num_eval_runs"] == 1 and metrics["student_steps"] == 4
    assert 0 <= metrics["accuracy_mean"] <= 1
    (teacher_folder,) = stage_folders(output_dir, "teacher")
    teacher = AutoModelForImageClassification.from_pretrained(teacher_folder)
    test, n = load_images(load_image_dataset(str(fmnist4_folder), "test"), 16, 1), TINY_RUN["max_test_examples"]
    assert metrics["teacher_accuracy"] == accuracy(teacher, test.images[:n], test.labels[:n])
    assert metrics["storage"] == metrics["planned_storage"] == result.pipeline.storage_report().to_dict()
    (subtask,) = metrics["subtasks"]
    assert subtask["classes"] == [0, 1, 2, 3] and len(subtask["loss_history"]["mtt"]) == TINY_RUN["iterations"]
    saved = json.loads((output_dir / "config.json").read_text())
    assert saved["iterations"] == TINY_RUN["iterations"]
    assert saved["mixed_precision"] == "no"  # the precision it ran in, though the config left it to Accelerate
    with PIL.Image.open(output_dir / "samples.png") as grid:  # a named row of 8 images per class, drawn large
        assert grid.width >= 8 * 60 and grid.height >= 4 * 60

    pipe = D3Pipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.latent_store.config.class_ids == [0, 1, 2, 3]
    assert pipe.latent_store.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    assert len(pipe.decoder.generators) == 1 and pipe.decoder.config.resolution == 16
    soft = pipe.latent_store.soft_labels
    assert torch.isfinite(soft).all() and torch.allclose(soft.sum(1), torch.ones(8), atol=1e-5)
    a = pipe(include_means=True, generator=torch.Generator().manual_seed(0), output_type="pt")
    b = result.pipeline(include_means=True, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(a.images, b.images) and torch.equal(a.soft_labels, b.soft_labels)


def test_a_rerun_of_other_teacher_epochs_retrains_only_the_teacher(runs, fmnist4_folder, caplog, tmp_path):
    """The experts and the subtask are reused under their keys; the teacher and the evaluation are new stages."""
    output_dir = runs[0]  # the stages; the result goes elsewhere, so the other tests still read the first run's
    settings = {"dataset": str(fmnist4_folder), "output_dir": str(tmp_path), "stage_dir": str(output_dir), **TINY_RUN}
    kept = {p: p.stat().st_mtime_ns for kind in ("experts", "subtasks", "teacher", "evaluations")
            for p in stage_folders(output_dir, kind)}
    with caplog.at_level("INFO", logger="hf_d3"):
        run_distillation(D3Config.from_dict({**settings, "teacher_epochs": TINY_RUN["teacher_epochs"] + 1}))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing of the first settings was touched or withdrawn
    new = {kind: [p for p in stage_folders(output_dir, kind) if p not in kept]
           for kind in ("experts", "subtasks", "teacher", "evaluations")}
    assert {kind: len(folders) for kind, folders in new.items()} == {"experts": 0, "subtasks": 0, "teacher": 1,
                                                                       "evaluations": 1}
    assert re.search(r"teacher: new settings, made in .*teacher/teacher-\w+ \(1 of other settings kept", caplog.text)
    assert re.search(r"subtask 0: reused from .*subtasks/subtask0-\w+", caplog.text)


def test_a_rerun_of_another_expert_lr_makes_new_experts_and_subtasks(runs, fmnist4_folder, caplog, tmp_path):
    output_dir = runs[0]
    config = D3Config.from_dict({"dataset": str(fmnist4_folder), "output_dir": str(tmp_path),
                                 "stage_dir": str(output_dir), **TINY_RUN})
    other = replace(config, experts=replace(config.experts, expert_lr=config.experts.expert_lr * 2))
    plan, other_plan = tiny_plan(config), tiny_plan(other)
    assert plan.experts[0][0].key != other_plan.experts[0][0].key
    assert plan.subtask_stages[0].key != other_plan.subtask_stages[0].key  # its experts are others
    assert plan.teacher.key != other_plan.teacher.key  # trained with the experts' optimiser
    with caplog.at_level("INFO", logger="hf_d3"):
        run_distillation(other)
    assert other_plan.experts[0][0].is_complete(output_dir) and other_plan.subtask_stages[0].is_complete(output_dir)
    assert plan.experts[0][0].is_complete(output_dir) and plan.subtask_stages[0].is_complete(output_dir)  # kept
    assert re.search(r"subtask 0 expert 0: new settings \(1 expert\(s\) of other settings kept", caplog.text)
    assert re.search(r"subtask 0: new settings, made in .*subtasks/subtask0-\w+ \(1 of other", caplog.text)


def test_the_evaluate_recipe_trains_the_runs_own_student(runs):
    """`recipes/evaluate.py RUN_DIR` reads the run's config.json: the same students, steps and seeds, so the same
    accuracies (one thread, as the run had); an override on the command line changes the student."""
    output_dir = runs[0]
    recipe = Path(__file__).parents[2] / "recipes" / "evaluate.py"

    def evaluate(*overrides: str, fails: bool = False) -> dict | str:
        done = subprocess.run([sys.executable, str(recipe), str(output_dir), *overrides], capture_output=True,
                              text=True, timeout=300)
        if fails:
            assert done.returncode != 0
            return done.stderr
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    metrics = json.loads((output_dir / "metrics.json").read_text())
    again = evaluate()
    assert {k: again[k] for k in ("accuracies", "student_architecture", "student_steps")} == {
        k: metrics[k] for k in ("accuracies", "student_architecture", "student_steps")}
    changed = evaluate("--eval_steps", "3", "--eval_seeds", "2")
    assert (changed["student_steps"], changed["num_eval_runs"]) == (3, 2)
    error = evaluate("--dataset", "builtin:fashion_mnist", fails=True)  # 10 classes, the pipeline's 4
    assert "the pipeline has 4 classes but the test split of dataset='builtin:fashion_mnist' has 10" in error


def test_the_evaluate_recipe_names_what_it_cannot_load(tmp_path):
    recipe = Path(__file__).parents[2] / "recipes" / "evaluate.py"
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for source, message in ((tmp_path / "unfinished", "is a run folder without pipeline/: the run has not finished"),
                            (tmp_path / "mistyped", "no D3 pipeline at .*mistyped': no such local path, and as a Hub")):
        done = subprocess.run([sys.executable, str(recipe), str(source)], capture_output=True, text=True, env=env)
        assert done.returncode == 1 and re.search(message, done.stderr), done.stderr[-1000:]


def test_a_teacher_checkpoint_labels_the_components(runs, fmnist4_folder, tmp_path):
    output_dir, *_ = runs
    torch.manual_seed(0)
    teacher = make_net(num_labels=4).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    rerun = tmp_path / "rerun"
    result = run_distillation(D3Config.from_dict({**TINY_RUN, "dataset": str(fmnist4_folder), "output_dir": str(rerun),
                                                  "stage_dir": str(output_dir),  # the distilled subtask, reused
                                                  "teacher": str(tmp_path / "teacher")}))
    store, decoder = result.pipeline.latent_store, result.pipeline.decoder
    weight = json.loads((rerun / "config.json").read_text())["hard_label_weight"]  # chosen from the storage
    assert weight == hard_label_weight_for(result.metrics.planned_storage["ipc_equivalent"])
    with torch.no_grad():
        soft = teacher(decoder.eval()(store.mean, store.component_subtask)).logits.softmax(1)
    expected = weight * nn.functional.one_hot(store.component_class, 4) + (1 - weight) * soft
    assert torch.allclose(store.soft_labels, expected, atol=1e-5)


def test_the_remedy_a_diverged_run_prints_finishes_it(tiny_run, tmp_path):
    """Followed as printed (lower learning rates, the same command otherwise), a run that diverged finishes: the
    subtask of the new rates is distilled afresh in a folder of its own, from the experts already trained."""
    with pytest.raises(FloatingPointError) as error:
        run_distillation(tiny_run(output_dir=str(tmp_path), syn_lr_init=1e12))
    assert "Lower the learning rates (lr_latents, lr_decoder, lr_lr) or syn_lr_init and rerun" in str(error.value)
    (expert,) = stage_folders(tmp_path, "experts")
    trained = (expert / "trajectory.safetensors").stat().st_mtime_ns
    result = run_distillation(tiny_run(output_dir=str(tmp_path), syn_lr_init=1e-2))
    assert result.metrics.subtasks[0].iterations_run == TINY_RUN["iterations"]
    assert (expert / "trajectory.safetensors").stat().st_mtime_ns == trained  # the experts were reused
