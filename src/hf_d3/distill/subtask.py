"""One subtask of a run, from its experts on disk to its finished latents and decoder in the run folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time

import torch
from datasets import Dataset

from ..atomic import write_json
from ..config import D3Config
from ..data import load_subtask_data
from ..experts import load_trajectory
from ..factories import build_decoder, build_latent_store
from ..federated import subtask_seed
from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore
from ..results import SubtaskStats
from ..run_folder import RunFolder
from .checkpoint import has_checkpoint
from .distiller import LossCallback, distill_subtask
from .warm_start import warm_start

logger = logging.getLogger(__name__)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory on `device`: a GPU's since its last `reset_peak_memory_stats` (each subtask resets it), else the
    process's resident peak so far (which the operating system cannot reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def distill_one_subtask(config: D3Config, folder: RunFolder, subtask: int, class_ids: list[int], train: Dataset,
                        class_names: list[str], device: torch.device, on_log: LossCallback | None = None
                        ) -> tuple[GaussianLatentStore, D3Decoder, SubtaskStats]:
    """Distil one subtask from its experts in `folder`; a finished subtask is reused (or continued, when the config
    asks for more iterations or time than it ran: `RunFolder.is_finished`), and an interrupted one
    resumes from its checkpoint (after the warm start, or at the last `checkpoint_every`). Returns its latent
    store, decoder and `SubtaskStats`. `on_log` receives the losses every `log_every` iterations
    (`distill_subtask`)."""
    if folder.is_finished(subtask, config.distillation):
        logger.info("subtask %d: finished by an earlier run, reused", subtask)
        return folder.load_subtask(subtask)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this subtask's peak, not the experts' or an earlier subtask's
    seed = subtask_seed(config.run.seed, subtask)
    generator = torch.Generator().manual_seed(seed)
    data = load_subtask_data(train, config.data, class_ids, seed, device)
    trajectories = [(model.to(device), trajectory.to(device)) for model, trajectory in
                    (load_trajectory(folder.expert(subtask, i)) for i in range(config.experts.num_experts))]

    torch.manual_seed(seed)
    store = build_latent_store(config.representation, class_ids, class_names).to(device)
    decoder = build_decoder(config.representation, config.data).to(device)
    objective = config.distillation
    if not has_checkpoint(folder.checkpoint(subtask)):
        start = time.perf_counter()
        mse = None
        if objective.init == "real":
            mse = warm_start(store, decoder, data, objective.init_steps, lr=objective.init_lr, generator=generator,
                             images_per_component=objective.init_images_per_component)
        write_json(folder.warm_start(subtask), {"warm_start_mse": mse,
                                                "warm_start_wall_time_s": time.perf_counter() - start})
    distilled = distill_subtask(store, decoder, data, trajectories, objective, generator,
                                checkpoint_dir=folder.checkpoint(subtask), desc=f"distill subtask {subtask}",
                                on_log=on_log, log_every=config.run.log_every)
    warm = json.loads(folder.warm_start(subtask).read_text())
    stats = SubtaskStats(**dataclasses.asdict(distilled), subtask=subtask, classes=class_ids,
                         warm_start_mse=warm["warm_start_mse"], warm_start_wall_time_s=warm["warm_start_wall_time_s"],
                         distill_wall_time_s=warm["warm_start_wall_time_s"] + distilled.iterations_wall_time_s,
                         peak_memory_bytes=peak_memory_bytes(device))
    folder.save_subtask(subtask, store, decoder, stats)
    logger.info("subtask %d finished: classes %s, %d iterations, %.1f s (warm start %.1f s)", subtask, class_ids,
                stats.iterations_run, stats.distill_wall_time_s, stats.warm_start_wall_time_s)
    return folder.load_subtask(subtask)
