"""The main job: real data -> expert trajectories -> distilled subtasks -> aggregated, relabelled and
evaluated pipeline."""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.utils import make_image_grid
from transformers import AutoModelForImageClassification

from .config import D3Config
from .data import ImageTensors, find_columns, load_image_dataset, to_tensors
from .distill import SubtaskData, distill_subtask, has_checkpoint, relabel, warm_start
from .evaluation import accuracy, evaluate_sampler, pipeline_sampler
from .experts import load_trajectory, save_trajectory, train_classifier, train_expert
from .federated import (
    aggregate,
    expert_rank,
    gather_to_all,
    plan_subtasks,
    run_and_gather,
    send_point_to_point,
    subtask_rank,
    subtask_seed,
    subtasks_of_rank,
)
from .models.classifiers import build_classifier
from .models.decoder import D3Decoder
from .models.latent_store import GaussianLatentStore
from .pipelines.pipeline_d3 import D3Pipeline


@dataclass
class RunResult:
    pipeline: D3Pipeline
    metrics: dict


def build_decoder(config: D3Config, num_subtasks: int = 1) -> D3Decoder:
    if config.decoder_preset:
        return D3Decoder.from_preset(config.decoder_preset, config.resolution, config.channels, num_subtasks,
                                     latent_dim=config.latent_dim, upsample_mode=config.decoder_upsample)
    return D3Decoder(
        latent_dim=config.latent_dim, resolution=config.resolution, out_channels=config.channels,
        channels=config.decoder_channels, latent_projection=config.decoder_latent_projection,
        upsample_kernel_size=config.decoder_kernel_size, upsample_mode=config.decoder_upsample,
        num_subtasks=num_subtasks,
    )


def net_kwargs(config: D3Config, architecture: str) -> dict:
    return {"width": config.net_width, **({"depth": config.net_depth} if architecture == "convnet" else {})}


def evaluate_with_config(config: D3Config, sampler, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         seeds: int | None = None) -> dict:
    """`evaluate_sampler` with the config's student settings (architecture, steps, batch, lr, augmentation)."""
    return evaluate_sampler(sampler, images, labels, num_classes, config.eval_architecture, config.eval_steps,
                            config.eval_batch_size, config.eval_lr, config.eval_augment,
                            config.eval_seeds if seeds is None else seeds,
                            **net_kwargs(config, config.eval_architecture))


def build_net(config: D3Config, num_labels: int, device: torch.device | str = "cpu"):
    return build_classifier(config.architecture, config.channels, config.resolution, num_labels,
                            **net_kwargs(config, config.architecture)).to(device)


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def check_storage_budget(config: D3Config, class_ids: list[int], num_subtasks: int) -> dict:
    """The storage of the full pipeline these sizes give; fails early if it exceeds `storage_budget_ipc`."""
    store = GaussianLatentStore(class_ids, len(class_ids), config.latents_per_class, config.latent_dim,
                                subtask_sizes=[len(b) for b in plan_subtasks(class_ids, num_subtasks)],
                                logvar_dim=config.logvar_dim)
    report = D3Pipeline(latent_store=store, decoder=build_decoder(config, num_subtasks)).storage_report()
    if config.storage_budget_ipc is not None and report.ipc_equivalent > config.storage_budget_ipc:
        raise ValueError(
            f"these sizes store {report.total_values:,} values = {report.ipc_equivalent:.2f} IPC-equivalent, over "
            f"storage_budget_ipc={config.storage_budget_ipc} (decoder {report.decoder_values:,}, latents "
            f"{report.latent_values:,}, labels {report.label_values:,}); shrink latents_per_class, latent_dim "
            "or decoder_channels"
        )
    return report.to_dict()


def subtask_folder(config: D3Config, subtask: int) -> Path:
    return Path(config.output_dir) / "subtasks" / f"subtask_{subtask}"


def expert_file(config: D3Config, subtask: int, expert: int) -> Path:
    return subtask_folder(config, subtask) / "experts" / f"expert_{expert}.safetensors"


def load_subtask_data(config: D3Config, subtask: int, class_ids: list[int], train, device: torch.device
                      ) -> SubtaskData:
    """The real images of one subtask's classes only, with local labels 0..n-1."""
    real = to_tensors(train, config.resolution, config.channels, classes=class_ids,
                      image_column=config.image_column, label_column=config.label_column,
                      max_per_class=config.max_train_per_class, seed=subtask_seed(config.seed, subtask))
    local = torch.searchsorted(torch.tensor(class_ids), real.labels)
    return SubtaskData(real.images.to(device), local.to(device), class_ids)


def train_expert_trajectories(config: D3Config, plan: list[list[int]], train, device: torch.device,
                              rank: int = 0, world_size: int = 1) -> list[dict]:
    """Every expert trajectory of the run, shared over the ranks (`expert_rank`); each ends up in the
    `experts` folder of the rank that distils its subtask, sent point to point when another rank trained it.
    Experts already on the distilling rank's disk (or of a finished subtask) are not trained again; expert i
    of subtask k is seeded by (seed, k, i) only. Returns, per rank, the (subtask, expert) pairs it trained."""
    num_subtasks, num_experts = len(plan), config.num_experts

    def on_my_disk() -> list[tuple[int, int]]:  # no shared filesystem: only the distilling rank can look
        return [(k, i) for k in subtasks_of_rank(num_subtasks, rank, world_size) for i in range(num_experts)
                if (subtask_folder(config, k) / "done.json").is_file() or expert_file(config, k, i).is_file()]

    finished = {tuple(job) for jobs in gather_to_all(on_my_disk()) for job in jobs}
    todo = [(k, i) for i in range(num_experts) for k in range(num_subtasks) if (k, i) not in finished]
    mine = [(k, i) for k, i in todo if expert_rank(k, i, num_subtasks, world_size) == rank]
    to_send = {}

    def work() -> dict:
        start = time.perf_counter()
        for k in sorted({k for k, _ in mine}):
            data = load_subtask_data(config, k, plan[k], train, device)
            for i in sorted(i for kk, i in mine if kk == k):
                trained = train_expert(partial(build_net, config, len(plan[k]), device), data.images,
                                       data.labels, config.trajectory_epochs, config.expert_lr,
                                       config.expert_batch_size, subtask_seed(config.seed, k) + i,
                                       config.expert_augment, desc=f"subtask {k} expert {i + 1}/{num_experts}")
                if subtask_rank(k, world_size) == rank:
                    save_trajectory(expert_file(config, k, i), *trained)
                else:
                    to_send[(k, i)] = trained
            del data
        return {"rank": rank, "experts": mine, "wall_time_s": time.perf_counter() - start}

    summary = run_and_gather(work)  # every rank learns of a failure before any waits on a send
    routes = [(job, expert_rank(*job, num_subtasks, world_size), subtask_rank(job[0], world_size)) for job in todo]
    for (k, i), trained in send_point_to_point(to_send, routes).items():
        save_trajectory(expert_file(config, k, i), *trained)
    return summary


def distill_one_subtask(config: D3Config, subtask: int, class_ids: list[int], train, class_names,
                        device: torch.device) -> dict:
    """Distillation of one subtask from its experts on disk (`train_expert_trajectories`); a finished subtask
    is reused, and an interrupted one resumes from its checkpoint (after the warm start, or at the last
    `checkpoint_every`)."""
    out = subtask_folder(config, subtask)
    if (out / "done.json").is_file():
        return _load_subtask(out)
    seed = subtask_seed(config.seed, subtask)
    generator = torch.Generator().manual_seed(seed)
    data = load_subtask_data(config, subtask, class_ids, train, device)
    trajectories = [(model.to(device), trajectory.to(device)) for model, trajectory in
                    (load_trajectory(expert_file(config, subtask, i)) for i in range(config.num_experts))]

    torch.manual_seed(seed)
    store = GaussianLatentStore(class_ids, len(class_names), config.latents_per_class, config.latent_dim,
                                class_names=class_names, logvar_dim=config.logvar_dim).to(device)
    decoder = build_decoder(config).to(device)
    warm_start_file = out / "warm_start.json"
    if not has_checkpoint(out / "checkpoint"):
        start = time.perf_counter()
        mse = None
        if config.init == "real":
            mse = warm_start(store, decoder, data, config.init_steps, lr=config.init_lr, generator=generator,
                             images_per_component=config.init_images_per_component)
        out.mkdir(parents=True, exist_ok=True)
        warm_start_file.write_text(json.dumps({"warm_start_mse": mse,
                                               "warm_start_wall_time_s": time.perf_counter() - start}))
    stats = distill_subtask(store, decoder, data, trajectories, config, generator,
                            checkpoint_dir=out / "checkpoint", desc=f"distill subtask {subtask}")
    stats.update(json.loads(warm_start_file.read_text()))
    stats.update(subtask=subtask, classes=class_ids, peak_memory_bytes=_peak_memory_bytes(),
                 distill_wall_time_s=stats["warm_start_wall_time_s"] + stats["iterations_wall_time_s"])
    store.save_pretrained(out / "latent_store")
    decoder.save_pretrained(out / "decoder")
    (out / "done.json").write_text(json.dumps(stats))
    return _load_subtask(out)


def _load_subtask(folder: Path) -> dict:
    return {"latent_store": GaussianLatentStore.from_pretrained(folder / "latent_store"),
            "decoder": D3Decoder.from_pretrained(folder / "decoder"),
            "stats": json.loads((folder / "done.json").read_text())}


def load_teacher(config: D3Config, train, num_classes: int, device: torch.device):
    """The relabelling teacher: a given checkpoint, or a global expert trained on all classes and all training
    images (`max_train_per_class` bounds only the experts and MMD) with momentum 0.9 for `teacher_epochs`,
    saved in `<output_dir>/teacher` and reused on a rerun. Soft labels are only as good as the teacher: the
    demo's trajectory experts (plain SGD, 69.95 % test accuracy) cost 12 points against hard labels, and a
    teacher trained on 1,000 images per class still scored only 79 % on held-out images."""
    if config.teacher:
        return AutoModelForImageClassification.from_pretrained(config.teacher).to(device)
    folder = Path(config.output_dir) / "teacher"
    if (folder / "config.json").is_file():
        return AutoModelForImageClassification.from_pretrained(folder).to(device)
    real = to_tensors(train, config.resolution, config.channels, image_column=config.image_column,
                      label_column=config.label_column)
    torch.manual_seed(config.seed)
    teacher = build_net(config, num_classes).to(device)
    train_classifier(teacher, real.images.to(device), real.labels.to(device), config.teacher_epochs,
                     config.expert_lr, config.expert_batch_size, torch.Generator().manual_seed(config.seed),
                     config.expert_augment, desc="global teacher", momentum=0.9)
    teacher.save_pretrained(folder)
    return teacher


def save_sample_grid(pipe: D3Pipeline, path: Path, per_class: int = 8, seed: int = 0) -> None:
    """A grid with one row per class: its mean images first, then samples."""
    m = pipe.latent_store.config.latents_per_class
    rows = []
    for c in pipe.latent_store.config.class_ids:
        out = pipe(class_labels=[c], include_means=True, num_samples_per_component=math.ceil(per_class / m),
                   generator=torch.Generator().manual_seed(seed))
        rows += out.images[:per_class]
    make_image_grid(rows, rows=len(pipe.latent_store.config.class_ids), cols=per_class).save(path)


def run_distillation(config: D3Config, accelerator: Accelerator | None = None) -> RunResult | None:
    """Run the whole job. Every rank distils its own subtasks; the main process aggregates, relabels,
    evaluates and writes `<output_dir>/pipeline`, `metrics.json` and `samples.png`. Returns the result on
    the main process and None elsewhere."""
    accelerator = accelerator or Accelerator()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:  # a folder with metrics.json must be a finished run of this config
        (output_dir / "metrics.json").unlink(missing_ok=True)
    start = time.perf_counter()

    train = load_image_dataset(config.dataset, config.train_split)
    class_names = list(train.features[find_columns(train, config.image_column, config.label_column)[1]].names)
    class_ids = list(range(len(class_names)))
    plan = plan_subtasks(class_ids, config.num_subtasks)
    storage = check_storage_budget(config, class_ids, config.num_subtasks)
    mine = subtasks_of_rank(config.num_subtasks, rank, world)

    experts = train_expert_trajectories(config, plan, train, device, rank, world)
    gathered = run_and_gather(lambda: {
        k: _portable(distill_one_subtask(config, k, plan[k], train, class_names, device)) for k in mine
    })
    distill_wall_time = time.perf_counter() - start
    if not accelerator.is_main_process:
        return None

    results = {k: v for per_rank in gathered for k, v in per_rank.items()}
    subtasks = [_restore(results[k]) for k in range(config.num_subtasks)]
    store, decoder = aggregate([s["latent_store"] for s in subtasks], [s["decoder"] for s in subtasks])
    pipe = D3Pipeline(latent_store=store, decoder=decoder).to(device)

    teacher = load_teacher(config, train, len(class_names), device)
    relabel(store, decoder, teacher, config.relabel_temperature)

    test = to_tensors(load_image_dataset(config.dataset, config.test_split), config.resolution, config.channels,
                      image_column=config.image_column, label_column=config.label_column)
    if config.max_test_examples:
        test = ImageTensors(test.images[:config.max_test_examples], test.labels[:config.max_test_examples],
                            test.class_names)
    test_images, test_labels = test.images.to(device), test.labels.to(device)
    evaluation = evaluate_with_config(config, pipeline_sampler(pipe), test_images, test_labels, len(class_names))
    metrics = {
        **evaluation,
        # soft labels are only as good as their teacher, so its own score belongs beside the students'
        "teacher_accuracy": accuracy(teacher, test_images, test_labels),
        "storage": pipe.storage_report().to_dict(),
        "planned_storage": storage,
        "distill_wall_time_s": distill_wall_time,
        "experts_per_rank": experts,
        "distill_peak_memory_bytes": max(s["stats"]["peak_memory_bytes"] for s in subtasks),
        "total_wall_time_s": time.perf_counter() - start,
        "num_processes": world,
        "subtasks": [s["stats"] for s in subtasks],
    }
    _write_outputs(pipe, metrics, config, output_dir)
    if config.push_to_hub:
        from .hub import publish_run

        publish_run(output_dir, config.hub_model_id, config.hub_dataset_id, private=config.hub_private)
    return RunResult(pipe, metrics)


def _write_outputs(pipe: D3Pipeline, metrics: dict, config: D3Config, output_dir: Path) -> None:
    # Written beside the final names, then moved: a folder that has metrics.json is complete.
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / "pipeline.partial"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging)
    shutil.rmtree(output_dir / "pipeline", ignore_errors=True)
    staging.rename(output_dir / "pipeline")
    save_sample_grid(pipe, output_dir / "samples.png")
    (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))


def _portable(result: dict) -> dict:
    # Modules are sent between processes as config + state dict of CPU tensors.
    return {name: (module.config, {k: v.cpu() for k, v in module.state_dict().items()})
            if name != "stats" else module for name, module in result.items()}


def _restore(portable: dict) -> dict:
    store_config, store_state = portable["latent_store"]
    decoder_config, decoder_state = portable["decoder"]
    store = GaussianLatentStore.from_config(store_config)
    store.load_state_dict(store_state)
    decoder = D3Decoder.from_config(decoder_config)
    decoder.load_state_dict(decoder_state)
    return {"latent_store": store, "decoder": decoder, "stats": portable["stats"]}
