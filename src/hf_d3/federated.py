"""Federated distillation: split classes into subtasks, spread them over processes, gather the results."""

from __future__ import annotations

import traceback
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .models.decoder import D3Decoder
from .models.latent_store import GaussianLatentStore


def plan_subtasks(class_ids: list[int], num_subtasks: int) -> list[list[int]]:
    """Contiguous blocks of classes, as the paper splits them; sizes differ by at most one."""
    if not 1 <= num_subtasks <= len(class_ids):
        raise ValueError(f"num_subtasks={num_subtasks} must be between 1 and the {len(class_ids)} classes")
    return [block.tolist() for block in np.array_split(np.asarray(class_ids), num_subtasks)]


def subtask_rank(subtask: int, world_size: int) -> int:
    """Round-robin assignment: the rank that distils `subtask`."""
    return subtask % world_size


def subtasks_of_rank(num_subtasks: int, rank: int, world_size: int) -> list[int]:
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


def subtask_seed(seed: int, subtask: int) -> int:
    """A subtask's seed depends only on the run seed and its index, never on the number of processes."""
    return seed * 100_003 + subtask


def gather_to_all(obj: Any) -> list[Any]:
    """Every rank's `obj`, on every rank, through the process group (no shared filesystem needed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


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
            dist.send_object_list([objects.pop(key)], dst=destination)
        elif rank == destination:
            box = [None]
            dist.recv_object_list(box, src=source)
            received[key] = box[0]
    return received


def run_and_gather(work) -> list[Any]:
    """Run `work()` on every rank and gather the results; if any rank failed, every rank raises with
    the failing ranks' tracebacks (so the job exits non-zero everywhere and nothing is aggregated)."""
    try:
        outcome = {"result": work(), "error": None}
    except Exception:
        outcome = {"result": None, "error": traceback.format_exc()}
    gathered = gather_to_all(outcome)
    failures = [(rank, o["error"]) for rank, o in enumerate(gathered) if o["error"] is not None]
    if failures:
        details = "\n".join(f"--- rank {rank} ---\n{error}" for rank, error in failures)
        raise RuntimeError(f"{len(failures)} rank(s) failed; nothing was aggregated:\n{details}")
    return [o["result"] for o in gathered]


def aggregate(
    subtask_stores: list[GaussianLatentStore], subtask_decoders: list[D3Decoder]
) -> tuple[GaussianLatentStore, D3Decoder]:
    """Join K single-subtask (store, decoder) pairs, in subtask order, into one store and a K-generator decoder."""
    first = subtask_stores[0].config
    store = GaussianLatentStore(
        class_ids=[c for s in subtask_stores for c in s.config.class_ids],
        num_classes=first.num_classes,
        latents_per_class=first.latents_per_class,
        latent_dim=first.latent_dim,
        class_names=first.class_names,
        subtask_sizes=[len(s.config.class_ids) for s in subtask_stores],
        logvar_dim=first.logvar_dim,
    )
    settings = {k: v for k, v in subtask_decoders[0].config.items() if not k.startswith("_")}
    decoder = D3Decoder.from_config({**settings, "num_subtasks": len(subtask_decoders)})
    with torch.no_grad():
        store.mean.copy_(torch.cat([s.mean for s in subtask_stores]))
        store.logvar.copy_(torch.cat([s.logvar for s in subtask_stores]))
        store.soft_labels.copy_(torch.cat([s.soft_labels for s in subtask_stores]))
    for generator, sub in zip(decoder.generators, subtask_decoders, strict=True):
        generator.load_state_dict(sub.generators[0].state_dict())
    return store, decoder
