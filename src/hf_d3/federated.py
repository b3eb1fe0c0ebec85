"""Federated distillation (docs/method.md, Federated plan): split the classes into subtasks, spread subtasks and
experts over the processes, route trajectories to the rank that needs them, gather and aggregate the results."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .data import ImageCache, load_subtask_images
from .experts import save_trajectory, train_expert
from .factories import build_net
from .models.decoder import D3Decoder
from .models.latent_store import GaussianLatentStore
from .results import ExpertWork, SubtaskStats
from .stages import expert_seed, subtask_seed

if TYPE_CHECKING:
    from datasets import Dataset

    from .config import D3Config
    from .run_plan import RunPlan

logger = logging.getLogger(__name__)


def subtask_rank(subtask: int, world_size: int) -> int:
    """Round-robin assignment: the rank that distils `subtask`."""
    return subtask % world_size


def subtasks_of_rank(num_subtasks: int, rank: int, world_size: int) -> list[int]:
    """The subtasks `rank` distils (`subtask_rank`)."""
    return [k for k in range(num_subtasks) if subtask_rank(k, world_size) == rank]


def expert_rank(subtask: int, expert: int, num_subtasks: int, world_size: int) -> int:
    """The rank that trains expert `expert` of `subtask`.

    With no more ranks than subtasks, the rank that distils the subtask (nothing to send). With spare ranks,
    the experts of all subtasks are dealt round-robin over every rank, expert index first, so expert 0 of
    each subtask stays on its distilling rank and the spare ranks train the rest instead of idling.
    """
    if world_size <= num_subtasks:
        return subtask_rank(subtask, world_size)
    return (expert * num_subtasks + subtask) % world_size


# TRUSTED, RANK TO RANK ONLY: the object collectives below (all_gather_object, send/recv_object_list) pickle, and
# this module is the one place hf_d3 uses them. They carry only what the ranks of one job send one another
# (tracebacks, finished-work lists, configs and tensors of experts and subtasks) over the job's own process group;
# nothing read from disk or the network is unpickled (tests/contracts/test_safety.py checks the package for it).
def gather_to_all(obj: Any) -> list[Any]:
    """Every rank's `obj`, on every rank, through the process group (no shared filesystem needed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    global _gathers
    _gathers += 1  # every rank gathers in the same order: the count names this gather on every rank
    rank, world, store = dist.get_rank(), dist.get_world_size(), _default_store()
    with _peers_answer(lambda: None if store is None else
                       [r for r in range(world) if not store.check([f"hf_d3/gather/{_gathers}/{r}"])]):
        if store is not None:
            store.set(f"hf_d3/gather/{_gathers}/{rank}", "1")  # reached this gather
        gathered = [None] * world
        dist.all_gather_object(gathered, obj)
    return gathered


class PeerLostError(RuntimeError):
    """A peer process died or stopped answering during a collective (after at most `collective_timeout_s`)."""


_gathers = 0


def _default_store():
    try:  # the process group's key-value store (in rank 0 or in the launcher's agent), to find who is missing
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 (a private helper: without it the message is less precise, no worse)
        return None


@contextmanager
def _peers_answer(lost_ranks):
    """Turn a collective's failure (a peer's connection closed, or the process group's timeout) into a
    `PeerLostError` naming the ranks `lost_ranks()` says did not answer."""
    start = time.perf_counter()
    try:
        yield
    except RuntimeError as error:  # gloo's and NCCL's errors, their timeouts included (not a pickling error)
        try:
            lost = lost_ranks()
        except Exception:  # noqa: BLE001 (the store lived in the lost process)
            lost = None
        who = (f"rank(s) {lost} never reached it" if lost else "a peer was lost inside it" if lost == []
               else "rank 0 or another peer stopped answering, and so did the store that rank 0 or the launcher keeps")
        raise PeerLostError(
            f"rank {dist.get_rank()} lost a peer in a collective after {time.perf_counter() - start:.1f} s: {who} "
            "(they died or hung; a rank waits at most collective_timeout_s). Nothing was aggregated or saved as a "
            f"pipeline; rerun to resume from the finished experts and subtasks. ({type(error).__name__}: {error})"
        ) from error


def send_point_to_point(objects: dict[Hashable, Any], routes: list[tuple[Hashable, int, int]]) -> dict[Hashable, Any]:
    """For each route (key, source, destination), in the same order on every rank, `source` sends
    `objects[key]` to `destination` only; returns what this rank received. Unlike a gather, an expert
    trajectory (up to GBs at ImageNet scale) is copied to the one rank that needs it."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    received = {}
    for key, source, destination in routes:
        if source == destination:
            continue
        if rank == source:
            with _peers_answer(lambda destination=destination: [destination]):
                dist.send_object_list([objects.pop(key)], dst=destination)
        elif rank == destination:
            box = [None]
            with _peers_answer(lambda source=source: [source]):
                dist.recv_object_list(box, src=source)
            received[key] = box[0]
    return received


def run_and_gather(work: Callable[[], Any]) -> list[Any]:
    """Run `work()` on every rank and gather the results; if any rank failed, every rank raises with
    the failing ranks' tracebacks (so the job exits non-zero everywhere and nothing is aggregated). A process alone
    raises its own error as it is (a mistake in the input then reaches the recipe as one line: `hf_d3.cli`)."""
    try:
        outcome = {"result": work(), "error": None}
    except Exception:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            raise
        outcome = {"result": None, "error": traceback.format_exc()}
    gathered = gather_to_all(outcome)
    failures = [(rank, o["error"]) for rank, o in enumerate(gathered) if o["error"] is not None]
    if failures:
        details = "\n".join(f"--- rank {rank} ---\n{error}" for rank, error in failures)
        raise RuntimeError(f"{len(failures)} rank(s) failed; nothing was aggregated:\n{details}")
    return [o["result"] for o in gathered]


def aggregate(
    subtask_stores: list[GaussianLatentStore], subtask_decoders: list[D3Decoder], label_top_k: int | None = None
) -> tuple[GaussianLatentStore, D3Decoder]:
    """Join K single-subtask (store, decoder) pairs, in subtask order, into one store and a K-generator decoder,
    the store keeping `label_top_k` probabilities of each soft label (the run's: a subtask's stage is reused
    whatever its labels' format, `hf_d3.stages.BUDGET_SETTINGS`)."""
    first = subtask_stores[0].config
    store = GaussianLatentStore(
        class_ids=[c for s in subtask_stores for c in s.config.class_ids],
        num_classes=first.num_classes,
        latents_per_class=first.latents_per_class,
        latent_dim=first.latent_dim,
        class_names=first.class_names,
        subtask_sizes=[len(s.config.class_ids) for s in subtask_stores],
        logvar_dim=first.logvar_dim,
        label_top_k=label_top_k,
    )
    settings = {k: v for k, v in subtask_decoders[0].config.items() if not k.startswith("_")}
    decoder = D3Decoder.from_config({**settings, "num_subtasks": len(subtask_decoders)})
    with torch.no_grad():
        store.mean.copy_(torch.cat([s.mean for s in subtask_stores]))
        store.logvar.copy_(torch.cat([s.logvar for s in subtask_stores]))
        store.set_soft_labels(torch.cat([s.soft_labels for s in subtask_stores]))
    for generator, sub in zip(decoder.generators, subtask_decoders, strict=True):
        generator.load_state_dict(sub.generators[0].state_dict())
    return store, decoder


def train_expert_trajectories(config: D3Config, plan: RunPlan, train: Dataset | ImageCache, device: torch.device,
                              rank: int = 0, world_size: int = 1) -> list[ExpertWork]:
    """Every expert trajectory of the run, shared over the ranks (`expert_rank`); each ends up as its stage
    (`plan.experts`) on the rank that distils its subtask, sent point to point when another rank trained it.
    Complete expert stages on the distilling rank's disk (and the experts of a finished subtask) are not trained
    again; expert i of subtask k is seeded by (seed, k, i) only. Returns, per rank, the experts it trained."""
    num_subtasks, num_experts, experts = len(plan.subtasks), config.experts.num_experts, config.experts
    stage_dir = plan.stage_dir

    # No shared filesystem: only the distilling rank can see what is finished.
    done = {k: plan.subtask_stages[k].is_complete(stage_dir) for k in subtasks_of_rank(num_subtasks, rank, world_size)}
    on_my_disk = [(k, i) for k in done for i in range(num_experts)
                  if done[k] or plan.experts[k][i].is_complete(stage_dir)]
    finished = {tuple(job) for jobs in gather_to_all(on_my_disk) for job in jobs}
    todo = [(k, i) for i in range(num_experts) for k in range(num_subtasks) if (k, i) not in finished]
    mine = [(k, i) for k, i in todo if expert_rank(k, i, num_subtasks, world_size) == rank]
    logger.info("experts: %d of %d already trained under these settings; rank %d trains %d", len(finished),
                num_subtasks * num_experts, rank, len(mine))
    for k, i in mine:
        if others := plan.experts[k][i].others(stage_dir):
            logger.info("subtask %d expert %d: new settings (%d expert(s) of other settings kept beside it)", k, i,
                        len(others))
    to_send = {}

    def save(k: int, i: int, model_config: dict, trajectory: list[torch.Tensor]) -> None:
        save_trajectory(plan.experts[k][i].folder(stage_dir), model_config, trajectory)
        plan.experts[k][i].complete(stage_dir)

    def work() -> ExpertWork:
        start = time.perf_counter()
        for k in sorted({k for k, _ in mine}):
            data = load_subtask_images(train, config.data, plan.subtasks[k], subtask_seed(config.run.seed, k), device)
            for i in sorted(i for kk, i in mine if kk == k):
                trained = train_expert(
                    partial(build_net, experts, config.data, len(plan.subtasks[k]), device), data.images, data.labels,
                    experts.trajectory_epochs, experts.expert_lr, experts.expert_batch_size,
                    expert_seed(config.run.seed, k, i), experts.expert_augment,
                    desc=f"subtask {k} expert {i + 1}/{num_experts}")
                if subtask_rank(k, world_size) == rank:
                    save(k, i, *trained)
                else:
                    to_send[(k, i)] = trained
            del data
        return ExpertWork(rank=rank, experts=mine, wall_time_s=time.perf_counter() - start)

    summary = run_and_gather(work)  # every rank learns of a failure before any waits on a send
    routes = [(job, expert_rank(*job, num_subtasks, world_size), subtask_rank(job[0], world_size)) for job in todo]
    for (k, i), trained in send_point_to_point(to_send, routes).items():
        logger.info("subtask %d expert %d: received from rank %d", k, i, expert_rank(k, i, num_subtasks, world_size))
        save(k, i, *trained)
    return summary


def to_portable(store: GaussianLatentStore, decoder: D3Decoder, stats: SubtaskStats) -> tuple:
    """A finished subtask as plain data to send between processes: each module as its config and a state dict of
    CPU tensors."""
    return (*((m.config, {k: v.cpu() for k, v in m.state_dict().items()}) for m in (store, decoder)), stats)


def from_portable(portable: tuple) -> tuple[GaussianLatentStore, D3Decoder, SubtaskStats]:
    """The subtask `to_portable` packed."""
    (store_config, store_state), (decoder_config, decoder_state), stats = portable
    store, decoder = GaussianLatentStore.from_config(store_config), D3Decoder.from_config(decoder_config)
    store.load_state_dict(store_state)
    decoder.load_state_dict(decoder_state)
    return store, decoder, stats
