"""The distillation loop of one subtask: trajectory matching then MMD, every iteration (docs/method.md, Objective)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..atomic import kill_point
from ..config import DistillationConfig
from ..data import SubtaskData
from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore
from ..progress import progress_bar
from ..results import DistillStats
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .losses import FlatModel, class_mmd_loss, trajectory_matching_loss

logger = logging.getLogger(__name__)

# Called with the number of iterations run so far and the mean of each loss since the previous call ("mtt",
# "mmd": the terms that are on) plus the learnable student learning rate ("lr").
LossCallback = Callable[[int, dict[str, float]], None]


def _optimizers(store: GaussianLatentStore, decoder: D3Decoder, syn_lr: torch.Tensor,
                config: DistillationConfig) -> dict[str, torch.optim.Optimizer]:
    return {
        "latents": torch.optim.SGD([store.mean, store.logvar], lr=config.lr_latents, momentum=0.5),
        "decoder": torch.optim.Adam(decoder.parameters(), lr=config.lr_decoder, weight_decay=1e-5),
        "lr": torch.optim.SGD([syn_lr], lr=config.lr_lr, momentum=0.5),
    }


def take_step(loss: torch.Tensor, weight: float, optimizers: list[torch.optim.Optimizer], term: str,
              iteration: int) -> None:
    """One optimiser step on `weight * loss`, refused (FloatingPointError) for a non-finite loss."""
    if not torch.isfinite(loss):  # raised before stepping: the parameters are still the last good state
        raise FloatingPointError(f"the {term} loss became {loss.item()} at iteration {iteration}")
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    (weight * loss).backward()
    for opt in optimizers:
        opt.step()


def _iterations_run(history: dict[str, list[float]]) -> int:
    return len(history["mtt"] or history["mmd"])  # an iteration counts once its losses are in the history


@torch.no_grad()
def refresh_batchnorm(decoder: D3Decoder, store: GaussianLatentStore, passes: int, generator: torch.Generator):
    """Recompute the decoder's running statistics as an average over batches of all components, so that
    eval-mode decoding (what the pipeline does) matches what distillation optimised."""
    norms = [m for m in decoder.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    decoder.train()
    for _ in range(passes):
        latents, index = store.sample(generator=generator)
        decoder(latents, store.component_subtask[index])
    for norm in norms:
        norm.momentum = 0.1
    decoder.eval()


def distill_subtask(
    store: GaussianLatentStore,
    decoder: D3Decoder,
    data: SubtaskData,
    trajectories: list[tuple[nn.Module, torch.Tensor]],
    config: DistillationConfig,
    generator: torch.Generator,
    checkpoint_dir: Path | None = None,
    desc: str = "distill",
    on_log: LossCallback | None = None,
    log_every: int = 10,
) -> DistillStats:
    """Optimise `store` and `decoder` (both of one subtask) for `config.iterations` iterations (or until
    `config.max_distill_time_s`).

    Each iteration is up to two optimiser steps: trajectory matching against a random expert and start epoch
    (if `mtt_weight` > 0), then per-class MMD on a random expert's features at a random epoch (if `mmd_weight`
    > 0).

    With `checkpoint_dir`, the starting state, every `checkpoint_every` iterations and the end state are saved
    there, and a checkpoint already there is resumed from: the iterations and time limit count the iterations
    before it, and the run continues as it would have without the interruption. The learning rates are the
    config's, so a run stopped by a NaN loss can resume with lower ones.

    `on_log` (a `LossCallback`) is called every `log_every` iterations and after the last one.
    """
    syn_lr = torch.tensor(config.syn_lr_init, requires_grad=True)
    optimizers = _optimizers(store, decoder, syn_lr, config)
    local_label = torch.arange(store.num_components) // store.config.latents_per_class
    batch = config.syn_batch_size or store.num_components
    nets = [FlatModel(model) for model, _ in trajectories]
    progress = {"iterations_wall_time_s": 0.0, "loss_history": {"mtt": [], "mmd": []}}
    if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
        progress = load_checkpoint(checkpoint_dir, store, decoder, syn_lr, optimizers, generator)
    history = progress["loss_history"]
    start = time.perf_counter()

    def elapsed() -> float:
        return progress["iterations_wall_time_s"] + time.perf_counter() - start

    def checkpoint() -> None:
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, store, decoder, syn_lr, optimizers, generator, {
                "iterations_run": _iterations_run(history), "loss_history": history,
                "iterations_wall_time_s": elapsed()})

    def pick_expert() -> tuple[FlatModel, torch.Tensor]:
        i = int(torch.randint(len(trajectories), (1,), generator=generator))
        return nets[i], trajectories[i][1]

    def report(logged: int) -> int:
        """Pass the mean losses of the iterations after `logged` to `on_log`; returns the iterations now logged."""
        done = _iterations_run(history)
        if on_log is not None and done > logged:
            means = {name: sum(values[logged:]) / len(values[logged:]) for name, values in history.items() if values}
            on_log(done, {**means, "lr": syn_lr.item()})  # a CPU tensor: reading it waits for no device
        return done

    decoder.train()
    first = logged = _iterations_run(history)
    logger.info("%s: iterations %d to %d, %d components", desc, first, config.iterations, store.num_components)
    if first == 0:
        checkpoint()  # after the warm start, which can be most of a subtask's time
    try:
        for iteration in progress_bar(range(first, config.iterations), desc=desc, leave=False, initial=first,
                                      total=config.iterations):
            if config.max_distill_time_s is not None and elapsed() >= config.max_distill_time_s:
                break
            losses = {}
            if config.mtt_weight > 0:
                net, trajectory = pick_expert()
                start_epoch = int(torch.randint(config.max_start_epoch, (1,), generator=generator))
                batches = []
                for _ in range(config.syn_steps):
                    components = torch.randperm(store.num_components, generator=generator)[:batch]
                    latents, _ = store.sample(components, generator=generator)
                    batches.append((decoder(latents), local_label[components]))
                losses["mtt"] = trajectory_matching_loss(net, trajectory[start_epoch],
                                                         trajectory[start_epoch + config.expert_epochs], batches,
                                                         syn_lr)
                take_step(losses["mtt"], config.mtt_weight, list(optimizers.values()), "trajectory matching",
                          iteration)
            if config.mmd_weight > 0:
                net, trajectory = pick_expert()
                flat = trajectory[int(torch.randint(len(trajectory), (1,), generator=generator))]
                losses["mmd"] = class_mmd_loss(store, decoder, data, partial(net.features, flat),
                                               config.mmd_samples_per_class, config.mmd_bandwidths, generator)
                take_step(losses["mmd"], config.mmd_weight, [optimizers["latents"], optimizers["decoder"]], "MMD",
                          iteration)
            for name, loss in losses.items():
                history[name].append(loss.item())
            if (iteration + 1) % log_every == 0:
                logged = report(logged)
            if (iteration + 1) % config.checkpoint_every == 0:
                checkpoint()
            kill_point("iteration")
    except FloatingPointError as error:
        checkpoint()
        where = "" if checkpoint_dir is None else f"; the last good state is saved in {checkpoint_dir}"
        raise FloatingPointError(f"{error}{where}. Lower the learning rates (lr_latents, lr_decoder, lr_lr) or "
                                 "syn_lr_init, and rerun to resume.") from None
    report(logged)  # the last iterations, stopped by the iteration count or the time limit
    checkpoint()  # so that a rerun with more iterations continues from here
    iterations_wall_time = elapsed()
    logger.info("%s: %d iterations run in %.1f s", desc, _iterations_run(history), iterations_wall_time)
    refresh_batchnorm(decoder, store, passes=10, generator=generator)
    return DistillStats(loss_history=history, syn_lr=syn_lr.item(), iterations_run=_iterations_run(history),
                        iterations_wall_time_s=iterations_wall_time)
