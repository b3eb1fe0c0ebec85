"""The distillation loop of one subtask: trajectory matching then MMD, every iteration (docs/method.md, Objective),
for any `SyntheticSet`: D3's latents and decoder (`distill_subtask`) or prototypes (`hf_d3.baselines`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..allocator import tune_malloc
from ..atomic import kill_point
from ..config import DistillationConfig
from ..data import RealImages
from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore
from ..precision import full_precision
from ..progress import progress_bar
from ..results import DistillStats
from .checkpoint import has_checkpoint
from .losses import FlatModel, InnerStep, compiled_sgd_step, trajectory_matching_loss
from .synthetic import LatentSet, SyntheticSet

logger = logging.getLogger(__name__)

# the most images decoded in one batch outside the loss terms (running statistics, relabelling): memory
DECODE_PART = 512
# Called with the number of iterations run so far and the mean of each loss since the previous call ("mtt",
# "mmd": the terms that are on) plus the learnable student learning rate ("lr").
LossCallback = Callable[[int, dict[str, float]], None]


def take_step(parts: Iterable[torch.Tensor], weight: float, optimizers: list[torch.optim.Optimizer], term: str,
              iteration: int) -> float:
    """One optimiser step on `weight * sum(parts)`, each part backpropagated as soon as it is computed (so one part's
    graph is held at a time), refused (FloatingPointError) for a non-finite loss; returns the loss.

    Reading each part's value is a host sync; the check needs the sum before stepping.
    """
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    # Only into what the optimisers step: the unroll's first student parameters are a leaf that needs a gradient
    # for the inner steps, and without `inputs` the backward would also compute theirs (a Hessian-vector product).
    # Out of any autocast region: on the CPU the backward runs in this thread, where autocast would also cast the
    # backward's own ops (the unroll's second-order terms among them) to bf16.
    stepped = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    value = 0.0
    for part in parts:
        value += part.item()
        if not math.isfinite(value):  # raised before stepping: the parameters are still the last good state
            raise FloatingPointError(f"the {term} loss became {value} at iteration {iteration}")
        with full_precision(part.device):
            (weight * part).backward(inputs=stepped)
    for opt in optimizers:
        opt.step()
    return value


def _inner_step(nets: list[FlatModel], compile_step: bool) -> InnerStep | None:
    """The compiled inner step shared by all experts (`compile_inner_step`), or None for the eager one.

    One compiled function serves every expert: `functional_call` replaces all of a network's parameters, so experts
    of one architecture differ only in the flat vector passed in (a function per expert would recompile for each,
    and fall back to eager past torch's recompile limit)."""
    if not compile_step:
        return None
    first = nets[0].model
    for net in nets[1:]:
        if net.model.config.to_dict() != first.config.to_dict():
            raise ValueError("compile_inner_step needs experts of one architecture; these differ")
    return compiled_sgd_step(nets[0])


def _iterations_run(history: dict[str, list[float]]) -> int:
    return len(history["mtt"] or history["mmd"])  # an iteration counts once its losses are in the history


@torch.no_grad()
def refresh_batchnorm(decoder: D3Decoder, store: GaussianLatentStore, passes: int, generator: torch.Generator
                      ) -> None:
    """Recompute the decoder's running statistics as an average over batches of all components, so that
    eval-mode decoding (what the pipeline does) matches what distillation optimised. Each pass decodes one sample
    of every component in near-equal parts of at most `DECODE_PART` (one part up to that many components): at
    8,400 components one batch of all took 2.5 GB for a moment."""
    norms = [m for m in decoder.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    decoder.train()
    for _ in range(passes):
        latents, index = store.sample(generator=generator)
        parts = -(-len(latents) // DECODE_PART)
        for z, k in zip(latents.tensor_split(parts), store.component_subtask[index].tensor_split(parts)):
            decoder(z, k)
    for norm in norms:
        norm.momentum = 0.1
    decoder.eval()


def distill_loop(
    synthetic: SyntheticSet,
    data: RealImages,
    trajectories: list[tuple[nn.Module, torch.Tensor]],
    config: DistillationConfig,
    generator: torch.Generator,
    checkpoint_dir: Path | None = None,
    desc: str = "distill",
    on_log: LossCallback | None = None,
    log_every: int = 10,
) -> DistillStats:
    """Optimise `synthetic` (D3's latents and decoder, or prototypes: `SyntheticSet`) for `config.iterations`
    iterations (or until `config.max_distill_time_s`).

    Each iteration is up to two optimiser steps: trajectory matching against a random expert and start epoch
    (if `mtt_weight` > 0), then per-class MMD on a random expert's features at a random epoch (if `mmd_weight`
    > 0).

    With `checkpoint_dir`, the starting state, every `checkpoint_every` iterations and the end state are saved
    there, and a checkpoint already there is resumed from: the iterations and time limit count the iterations
    before it, and the run continues as it would have without the interruption.

    `on_log` (a `LossCallback`) is called every `log_every` iterations and after the last one.
    """
    tune_malloc()  # on a CPU, a third of the unroll's time was the kernel zero-filling fresh pages
    batch = config.syn_batch_size or len(synthetic.labels)
    nets = [FlatModel(model) for model, _ in trajectories]
    inner_step = _inner_step(nets, config.compile_inner_step) if config.mtt_weight > 0 else None
    progress = {"iterations_wall_time_s": 0.0, "loss_history": {"mtt": [], "mmd": []}}
    if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
        progress = synthetic.load(checkpoint_dir, generator)
    history = progress["loss_history"]
    start = time.perf_counter()

    def elapsed() -> float:
        return progress["iterations_wall_time_s"] + time.perf_counter() - start

    def checkpoint() -> None:
        if checkpoint_dir is not None:
            synthetic.save(checkpoint_dir, generator, {"iterations_run": _iterations_run(history),
                                                       "loss_history": history, "iterations_wall_time_s": elapsed()})

    def pick_expert() -> tuple[FlatModel, torch.Tensor]:
        i = int(torch.randint(len(trajectories), (1,), generator=generator))
        return nets[i], trajectories[i][1]

    def report(logged: int) -> int:
        """Pass the mean losses of the iterations after `logged` to `on_log`; returns the iterations now logged."""
        done = _iterations_run(history)
        if on_log is not None and done > logged:
            means = {name: sum(values[logged:]) / len(values[logged:]) for name, values in history.items() if values}
            on_log(done, {**means, "lr": synthetic.syn_lr.item()})  # one host read per log, outside the unroll
        return done

    first = logged = _iterations_run(history)
    logger.info("%s: iterations %d to %d, %d components", desc, first, config.iterations, len(synthetic.labels))
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
                batches = synthetic.unroll_batches(config.syn_steps, batch, generator)
                loss = trajectory_matching_loss(net, trajectory[start_epoch],
                                                trajectory[start_epoch + config.expert_epochs], batches,
                                                synthetic.syn_lr, inner_step)
                losses["mtt"] = take_step([loss], config.mtt_weight, list(synthetic.optimizers.values()),
                                          "trajectory matching", iteration)
            if config.mmd_weight > 0:
                net, trajectory = pick_expert()
                flat = trajectory[int(torch.randint(len(trajectory), (1,), generator=generator))]
                parts = synthetic.mmd_parts(data, partial(net.features, flat), config.mmd_samples_per_class,
                                            config.mmd_bandwidths, generator)
                losses["mmd"] = take_step(parts, config.mmd_weight, list(synthetic.image_optimizers.values()),
                                          "MMD", iteration)
            synthetic.end_iteration()
            for name, value in losses.items():
                history[name].append(value)
            if (iteration + 1) % log_every == 0:
                logged = report(logged)
            if (iteration + 1) % config.checkpoint_every == 0:
                checkpoint()
            kill_point("iteration")
    except FloatingPointError as error:  # no checkpoint now: the iteration's draws and steps are half done
        where = "" if checkpoint_dir is None else f"; the last good state is saved in {checkpoint_dir}"
        raise FloatingPointError(f"{error}{where}. Lower the learning rates (lr_latents, lr_decoder, lr_lr) or "
                                 "syn_lr_init and rerun: a subtask of other settings is distilled afresh in a "
                                 "folder of its own, from the finished experts.") from None
    report(logged)  # the last iterations, stopped by the iteration count or the time limit
    checkpoint()  # so that a rerun with more iterations continues from here
    iterations_wall_time = elapsed()
    logger.info("%s: %d iterations run in %.1f s", desc, _iterations_run(history), iterations_wall_time)
    return DistillStats(loss_history=history, syn_lr=synthetic.syn_lr.item(), iterations_run=_iterations_run(history),
                        iterations_wall_time_s=iterations_wall_time)


def distill_subtask(
    store: GaussianLatentStore,
    decoder: D3Decoder,
    data: RealImages,
    trajectories: list[tuple[nn.Module, torch.Tensor]],
    config: DistillationConfig,
    generator: torch.Generator,
    checkpoint_dir: Path | None = None,
    desc: str = "distill",
    on_log: LossCallback | None = None,
    log_every: int = 10,
) -> DistillStats:
    """`distill_loop` on `store` and `decoder` (both of one subtask), then the decoder's batch-norm statistics
    refreshed for eval-mode decoding (`refresh_batchnorm`)."""
    stats = distill_loop(LatentSet(store, decoder, config), data, trajectories, config, generator, checkpoint_dir,
                         desc, on_log, log_every)
    refresh_batchnorm(decoder, store, passes=10, generator=generator)
    return stats
