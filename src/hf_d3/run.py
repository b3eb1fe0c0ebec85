"""The main job, top to bottom: real data -> expert trajectories -> distilled subtasks -> gathered, relabelled,
evaluated and saved pipeline (docs/method.md, Federated plan)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from accelerate import Accelerator

from .config import D3Config
from .data import class_names_of, load_image_dataset, load_test_split
from .distill.subtask import distill_one_subtask
from .evaluation import accuracy, evaluate_with_config, pipeline_sampler
from .factories import planned_storage
from .federated import (
    aggregate,
    from_portable,
    plan_subtasks,
    run_and_gather,
    subtasks_of_rank,
    to_portable,
    train_expert_trajectories,
)
from .hub import publish_run
from .pipelines.pipeline_d3 import D3Pipeline
from .results import RunMetrics
from .run_folder import RunFolder
from .sizing import resolve_sizes
from .teacher import load_teacher, relabel


@dataclass
class RunResult:
    pipeline: D3Pipeline
    metrics: RunMetrics


def run_distillation(config: D3Config, accelerator: Accelerator | None = None) -> RunResult | None:
    """Run the whole job. Every rank distils its own subtasks; the main process aggregates, relabels,
    evaluates and writes the run folder (`hf_d3.run_folder`). Returns the result on the main process and None
    elsewhere. A rerun with the same `output_dir` reuses every finished expert and subtask."""
    accelerator = accelerator or Accelerator()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    folder = RunFolder(config.run.output_dir)
    if accelerator.is_main_process:
        folder.start()
    start = time.perf_counter()

    # Real data and the plan: which classes each subtask distils, their sizes, and the storage that gives.
    data = config.data
    train = load_image_dataset(data.dataset, data.train_split)
    class_names = class_names_of(data, train)
    plan = plan_subtasks(list(range(len(class_names))), config.run.num_subtasks)
    config = resolve_sizes(config, len(class_names))
    storage = planned_storage(config, plan)

    # Experts, then every rank distils its subtasks; the results reach the main process.
    experts = train_expert_trajectories(config, folder, plan, train, device, rank, world)
    gathered = run_and_gather(lambda: {
        k: to_portable(*distill_one_subtask(config, folder, k, plan[k], train, class_names, device))
        for k in subtasks_of_rank(len(plan), rank, world)
    })
    distill_wall_time = time.perf_counter() - start
    if not accelerator.is_main_process:
        return None
    finished = {k: from_portable(portable) for per_rank in gathered for k, portable in per_rank.items()}
    stores, decoders, stats = zip(*(finished[k] for k in range(len(plan))), strict=True)
    store, decoder = aggregate(list(stores), list(decoders))
    pipe = D3Pipeline(latent_store=store, decoder=decoder).to(device)

    # Relabel with a global teacher, then train students on the distilled data and test them on real data.
    teacher = load_teacher(config, folder.teacher, train, device)
    relabel(store, decoder, teacher, config.relabel.relabel_temperature)
    test = load_test_split(data)
    test_images, test_labels = test.images.to(device), test.labels.to(device)
    evaluation = evaluate_with_config(config.evaluation, config.experts, pipeline_sampler(pipe), test_images,
                                      test_labels, len(class_names))

    metrics = RunMetrics(
        **dataclasses.asdict(evaluation),
        teacher_accuracy=accuracy(teacher, test_images, test_labels),
        storage=pipe.storage_report().to_dict(),
        planned_storage=storage.to_dict(),
        distill_wall_time_s=distill_wall_time,
        distill_peak_memory_bytes=max(s.peak_memory_bytes for s in stats),
        total_wall_time_s=time.perf_counter() - start,
        num_processes=world,
        experts_per_rank=experts,
        subtasks=list(stats),
    )
    folder.write_results(pipe, metrics, config)
    if config.hub.push_to_hub:
        publish_run(folder.root, config.hub.hub_model_id, config.hub.hub_dataset_id, private=config.hub.hub_private)
    return RunResult(pipe, metrics)
