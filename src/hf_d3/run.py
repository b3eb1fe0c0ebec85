"""The main job, top to bottom: real data -> expert trajectories -> distilled subtasks -> gathered, relabelled,
evaluated and saved pipeline (docs/method.md, Federated plan).

Progress is logged with `logging` (each module's own logger) and, with `report_to`, to Accelerate's trackers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from .config import D3Config, RunConfig
from .data import class_names_of, load_split, load_test_images
from .distill.distiller import LossCallback
from .distill.subtask import distilled_subtask
from .evaluation import accuracy, evaluate_with_config, pipeline_sampler
from .federated import (
    aggregate,
    from_portable,
    run_and_gather,
    subtasks_of_rank,
    to_portable,
    train_expert_trajectories,
)
from .pipelines.pipeline_d3 import D3Pipeline
from .preflight import check_run_input
from .results import EvaluationResult, RunMetrics
from .run_folder import RunFolder, publish_run
from .run_plan import RunPlan, make_plan
from .teacher import load_teacher, relabel

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What `run_distillation` returns on the main process: the distilled pipeline and the run's metrics."""

    pipeline: D3Pipeline
    metrics: RunMetrics


def make_accelerator(run: RunConfig, **kwargs: Any) -> Accelerator:
    """An `Accelerator` reporting to the run's trackers (`report_to`), which write under `<output_dir>/logs`;
    `kwargs` go to `Accelerator`. Unless they give `kwargs_handlers`, a rank waits at most `collective_timeout_s`
    for its peers, so a dead peer cannot hang the job forever."""
    kwargs.setdefault("kwargs_handlers", [InitProcessGroupKwargs(timeout=timedelta(seconds=run.collective_timeout_s))])
    if run.mixed_precision is not None:
        kwargs.setdefault("mixed_precision", run.mixed_precision)
    project = ProjectConfiguration(project_dir=run.output_dir, logging_dir=str(Path(run.output_dir) / "logs"))
    return Accelerator(log_with=run.trackers or None, project_config=project, **kwargs)


def tracker_config(settings: dict[str, Any]) -> dict[str, int | float | str | bool]:
    """The flat settings as trackers take them: lists and None become strings."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in settings.items()}


def evaluated(config: D3Config, plan: RunPlan, pipe: D3Pipeline, test_images: torch.Tensor,
              test_labels: torch.Tensor) -> EvaluationResult:
    """The students' evaluation of the relabelled `pipe`: its stage's (`plan.evaluation`) if an earlier run made it
    under the same settings, else trained and kept as that stage."""
    stage = plan.evaluation
    logger.info("evaluation: %s", stage.describe_reuse(plan.stage_dir))
    if stage.is_complete(plan.stage_dir):
        return EvaluationResult(**stage.read_result(plan.stage_dir))
    evaluation = evaluate_with_config(config.evaluation, config.experts, pipeline_sampler(pipe), test_images,
                                      test_labels, len(plan.class_names))
    stage.complete(plan.stage_dir, evaluation.to_dict())
    return evaluation


def log_losses(accelerator: Accelerator, subtask: int) -> LossCallback:
    """The distillation losses of `subtask`, to this module's logger and to the trackers as `subtask_<k>/<loss>`.

    Accelerate's trackers log on the main process only: the losses of subtasks distilled on other ranks reach only
    the logger of their rank (and every subtask's `loss_history` in metrics.json)."""

    def log(iteration: int, losses: dict[str, float]) -> None:
        logger.info("subtask %d, iteration %d: %s", subtask, iteration,
                    ", ".join(f"{name}={value:.6g}" for name, value in losses.items()))
        accelerator.log({f"subtask_{subtask}/{name}": value for name, value in losses.items()}, step=iteration)

    return log


def run_distillation(config: D3Config, accelerator: Accelerator | None = None) -> RunResult | None:
    """`_run_distillation` in the accelerator's autocast region: with `mixed_precision: bf16` (or Accelerate launched
    so), experts, MMD, teacher and students run in bf16 autocast; the trajectory-matching unroll opts out."""
    accelerator = accelerator or make_accelerator(config.run)
    with accelerator.autocast():
        return _run_distillation(config, accelerator)


def _run_distillation(config: D3Config, accelerator: Accelerator | None = None) -> RunResult | None:
    """Run the whole job. Every rank distils its own subtasks; the main process aggregates, relabels,
    evaluates and writes the run folder (`hf_d3.run_folder`). Returns the result on the main process and None
    elsewhere. A rerun reuses every complete stage of its settings (`hf_d3.stages`) and continues the others.

    Without `accelerator`, one is made from `config.run` (`make_accelerator`). Trackers it has are started here
    and finished at the end; `accelerator.end_training()` is left to the caller, since it also ends the process
    group."""
    accelerator = accelerator or make_accelerator(config.run)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    folder = RunFolder(config.run.output_dir)
    start = time.perf_counter()

    # Real data and the plan: which classes each subtask distils, their sizes, the storage that gives, the stages.
    data = config.data
    train = load_split(data, data.train_split)  # with streaming: the image cache, built by all ranks together
    if data.streaming:
        load_split(data, data.test_split)  # here, by all ranks: the main process alone reads it at the end
    # the precision the run has, however it was given (a launch flag leaves the config's unset)
    plan = make_plan(config, class_names_of(data, train), accelerator.mixed_precision)
    # Bad input stops the run here, before any training and before an earlier result is withdrawn.
    check_run_input(config, plan, folder.root, train, rank, world)
    if accelerator.is_main_process:
        folder.start()
    per_class = data.max_train_per_class
    logger.info("%d training images of %d classes (%s), in %d subtask(s), %d process(es); planned storage %d "
                "values = %.2f IPC-equivalent; stage results in %s", len(train), len(plan.class_names),
                "all of them for experts and subtasks" if per_class is None else
                f"experts and subtasks use at most {per_class} of each class, the teacher all",
                len(plan.subtasks), world, plan.storage.total_values, plan.storage.ipc_equivalent, plan.stage_dir)
    if config.run.trackers and not accelerator.log_with:
        logger.warning("report_to=%r: the accelerator has no tracker (none installed, or made without log_with: "
                       "see make_accelerator)", config.run.report_to)
    if accelerator.log_with:
        accelerator.init_trackers("hf_d3", config=tracker_config(plan.run_settings(config)))

    # Experts, then every rank distils its subtasks; the results reach the main process.
    experts = train_expert_trajectories(config, plan, train, device, rank, world)
    gathered = run_and_gather(lambda: {
        k: to_portable(*distilled_subtask(config, plan, k, train, device, on_log=log_losses(accelerator, k)))
        for k in subtasks_of_rank(len(plan.subtasks), rank, world)
    })
    distill_wall_time = time.perf_counter() - start
    logger.info("experts and distillation finished in %.1f s", distill_wall_time)
    if not accelerator.is_main_process:
        return None
    finished = {k: from_portable(portable) for per_rank in gathered for k, portable in per_rank.items()}
    stores, decoders, stats = zip(*(finished[k] for k in range(len(plan.subtasks))), strict=True)
    store, decoder = aggregate(list(stores), list(decoders), config.representation.label_top_k)
    pipe = D3Pipeline(latent_store=store, decoder=decoder).to(device)

    # Relabel with a global teacher, then train students on the distilled data and test them on real data.
    teacher = load_teacher(config, plan, train, device)
    relabel(store, decoder, teacher, config.relabel.relabel_temperature, plan.hard_label_weight)
    pipe.set_storage_dtype(config.representation.storage_dtype)  # the students learn from what is saved
    test = load_test_images(data)
    test_images, test_labels = test.images.to(device), test.labels.to(device)
    evaluation = evaluated(config, plan, pipe, test_images, test_labels)

    metrics = RunMetrics(
        **dataclasses.asdict(evaluation),
        teacher_accuracy=accuracy(teacher, test_images, test_labels),
        storage=pipe.storage_report().to_dict(),
        planned_storage=plan.storage.to_dict(),
        distill_wall_time_s=distill_wall_time,
        distill_peak_memory_bytes=max(s.peak_memory_bytes for s in stats),
        total_wall_time_s=time.perf_counter() - start,
        num_processes=world,
        experts_per_rank=experts,
        subtasks=list(stats),
    )
    folder.write_results(pipe, metrics, plan.run_settings(config))
    logger.info("accuracy on the test split: teacher %.4f, students %.4f +- %.4f over %d; storage %.2f "
                "IPC-equivalent; saved to %s",
                metrics.teacher_accuracy, metrics.accuracy_mean, metrics.accuracy_std, metrics.num_eval_runs,
                metrics.storage["ipc_equivalent"], folder.root)
    accelerator.log({"accuracy_mean": metrics.accuracy_mean, "accuracy_std": metrics.accuracy_std,
                     "teacher_accuracy": metrics.teacher_accuracy,
                     "storage_ipc_equivalent": metrics.storage["ipc_equivalent"]})
    for tracker in accelerator.trackers:
        tracker.finish()  # flushed and closed: the run's logs are complete once it returns
    if config.hub.push_to_hub:
        publish_run(folder.root, config.hub.hub_model_id, config.hub.hub_dataset_id, private=config.hub.hub_private)
    return RunResult(pipe, metrics)
