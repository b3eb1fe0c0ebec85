"""One subtask of a run as a stage (`hf_d3.stages`): from its experts to its finished latents and decoder."""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from datasets import Dataset

from ..atomic import staged, write_json
from ..config import D3Config
from ..data import ImageCache, load_subtask_images
from ..experts import load_trajectory
from ..factories import build_decoder, build_latent_store
from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore, folded_ids
from ..results import SubtaskStats
from ..stages import continuable_checkpoint, subtask_seed
from .checkpoint import has_checkpoint
from .distiller import LossCallback, distill_subtask
from .warm_start import warm_start

if TYPE_CHECKING:
    from ..run_plan import RunPlan

logger = logging.getLogger(__name__)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory on `device`: a GPU's since its last `reset_peak_memory_stats` (each subtask resets it), else the
    process's resident peak so far (which the operating system cannot reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def save_subtask(folder: Path, store: GaussianLatentStore, decoder: D3Decoder) -> None:
    """A finished subtask's latent store and decoder, each written atomically (its stage is marked after)."""
    with staged(folder / "latent_store") as staging:
        store.save_pretrained(staging)
    with staged(folder / "decoder") as staging:
        decoder.save_pretrained(staging)


def load_subtask(folder: Path) -> tuple[GaussianLatentStore, D3Decoder]:
    """What `save_subtask` wrote."""
    return GaussianLatentStore.from_pretrained(folder / "latent_store"), D3Decoder.from_pretrained(folder / "decoder")


def distilled_subtask(config: D3Config, plan: RunPlan, subtask: int, train: Dataset | ImageCache,
                      device: torch.device, on_log: LossCallback | None = None
                      ) -> tuple[GaussianLatentStore, D3Decoder, SubtaskStats]:
    """Subtask `subtask` of the plan, distilled from its experts' stages: reused when its stage is complete; resumed
    from its own checkpoint when a run of it was interrupted (after the warm start, or at the last
    `checkpoint_every`); else started from the checkpoint of the same subtask distilled for fewer iterations or less
    time (`hf_d3.stages.continuable_checkpoint`), or afresh. Returns its latent store, decoder and `SubtaskStats`.
    `on_log` receives the losses every `log_every` iterations (`distill_subtask`)."""
    stage, stage_dir = plan.subtask_stages[subtask], plan.stage_dir
    folder, class_ids = stage.folder(stage_dir), plan.subtasks[subtask]
    logger.info("subtask %d: %s", subtask, stage.describe_reuse(stage_dir))
    if stage.is_complete(stage_dir):
        return *load_subtask(folder), SubtaskStats.from_dict(stage.read_result(stage_dir))
    if not has_checkpoint(folder / "checkpoint") and (
            earlier := continuable_checkpoint(stage, stage_dir, config.distillation)) is not None:
        logger.info("subtask %d: continues from %s", subtask, earlier)
        write_json(folder / "warm_start.json", json.loads((earlier.parent / "warm_start.json").read_text()))
        with staged(folder / "checkpoint") as staging:  # last: its presence skips the warm start
            shutil.copytree(earlier, staging)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this subtask's peak, not the experts' or an earlier subtask's
    seed = subtask_seed(config.run.seed, subtask)
    generator = torch.Generator().manual_seed(seed)
    data = load_subtask_images(train, config.data, class_ids, seed, device)
    trajectories = [(model.to(device), trajectory.to(device)) for model, trajectory in
                    (load_trajectory(expert.folder(stage_dir)) for expert in plan.experts[subtask])]

    torch.manual_seed(seed)
    store = build_latent_store(plan.sizes, class_ids, plan.class_names).to(device)
    decoder = build_decoder(plan.sizes, config.data).to(device)
    objective = config.distillation
    if not has_checkpoint(folder / "checkpoint"):
        start = time.perf_counter()
        mse = None
        if objective.init == "real":
            mse = warm_start(store, decoder, data, objective.init_steps, lr=objective.init_lr, generator=generator,
                             images_per_component=objective.init_images_per_component)
        write_json(folder / "warm_start.json", {"warm_start_mse": mse,
                                                "warm_start_wall_time_s": time.perf_counter() - start})
    distilled = distill_subtask(store, decoder, data, trajectories, objective, generator,
                                checkpoint_dir=folder / "checkpoint", desc=f"distill subtask {subtask}",
                                on_log=on_log, log_every=config.run.log_every)
    warm = json.loads((folder / "warm_start.json").read_text())
    stats = SubtaskStats(**dataclasses.asdict(distilled), subtask=subtask, classes=class_ids,
                         warm_start_mse=warm["warm_start_mse"], warm_start_wall_time_s=warm["warm_start_wall_time_s"],
                         distill_wall_time_s=warm["warm_start_wall_time_s"] + distilled.iterations_wall_time_s,
                         peak_memory_bytes=peak_memory_bytes(device))
    save_subtask(folder, store, decoder)
    stage.complete(stage_dir, dataclasses.asdict(stats))
    logger.info("subtask %d finished: classes %s, %d iterations, %.1f s (warm start %.1f s)", subtask,
                folded_ids(class_ids), stats.iterations_run, stats.distill_wall_time_s, stats.warm_start_wall_time_s)
    return *load_subtask(folder), stats
