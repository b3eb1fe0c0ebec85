"""Federated distillation within one process: the subtask plan, the seeds, gathering and aggregation (the real
multi-process runs: tests/integration/test_federated_runs.py)."""

from __future__ import annotations

import pytest
import torch

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore
from hf_d3.federated import aggregate, expert_rank, gather_to_all, run_and_gather, send_point_to_point, subtasks_of_rank
from hf_d3.run_plan import plan_subtasks
from hf_d3.stages import expert_seed, subtask_seed

# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------


def test_plan_is_contiguous_blocks():
    assert plan_subtasks(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert plan_subtasks(list(range(4)), 2) == [[0, 1], [2, 3]]
    assert plan_subtasks([3, 5, 9], 2) == [[3, 5], [9]]
    assert plan_subtasks([4], 1) == [[4]]
    for n in range(1, 13):
        for k in range(1, n + 1):
            plan = plan_subtasks(list(range(n)), k)
            assert [c for block in plan for c in block] == list(range(n))  # contiguous, in order, all classes
            sizes = [len(block) for block in plan]
            assert len(plan) == k and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("k", [0, 11, -1])
def test_plan_rejects_impossible_splits(k):
    with pytest.raises(ValueError, match=f"num_subtasks={k} must be between 1 and the 10 classes"):
        plan_subtasks(list(range(10)), k)


def test_subtasks_of_rank_partition_the_subtasks():
    assert subtasks_of_rank(5, 0, 2) == [0, 2, 4] and subtasks_of_rank(5, 1, 2) == [1, 3]
    assert subtasks_of_rank(2, 2, 3) == []  # more processes than subtasks: this rank idles
    for k in range(1, 8):
        for world in range(1, 5):
            per_rank = [subtasks_of_rank(k, rank, world) for rank in range(world)]
            assert sorted(s for mine in per_rank for s in mine) == list(range(k))
            assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_experts_stay_on_their_subtask_rank_unless_there_are_spare_ranks():
    # no spare rank: a subtask's experts are trained where it is distilled, so nothing is sent
    for k in range(5):
        assert {expert_rank(k, i, 5, 2) for i in range(4)} == {k % 2}
    # 3 ranks, 2 subtasks, 2 experts: rank 2 would idle; it takes expert 1 of subtask 0
    assert [[expert_rank(k, i, 2, 3) for k in range(2)] for i in range(2)] == [[0, 1], [2, 0]]
    for k_count in range(1, 5):
        for world in range(k_count + 1, 9):
            for n in range(1, 6):
                jobs = [expert_rank(k, i, k_count, world) for i in range(n) for k in range(k_count)]
                assert all(expert_rank(k, 0, k_count, world) == k for k in range(k_count))
                counts = [jobs.count(r) for r in range(world)]
                assert max(counts) - min(counts) <= 1  # no rank idles while another trains two more


def test_point_to_point_in_one_process_keeps_everything_local():
    assert send_point_to_point({"a": 1}, [("a", 0, 0)]) == {}


def test_subtask_seeds_are_distinct_and_need_no_world_size():
    seeds = {subtask_seed(s, k) for s in range(5) for k in range(50)}
    assert len(seeds) == 250


def test_expert_seeds_are_distinct_across_subtasks():
    seeds = {expert_seed(s, k, i) for s in range(3) for k in range(10) for i in range(20)}
    assert len(seeds) == 3 * 10 * 20
    assert [expert_seed(7, 0, i) for i in range(3)] == [subtask_seed(7, 0) + i for i in range(3)]  # as before


# ----------------------------------------------------------------------------------------------------------
# Gathering (one process) and aggregation
# ----------------------------------------------------------------------------------------------------------


def test_run_and_gather_in_one_process():
    assert gather_to_all({"a": 1}) == [{"a": 1}]
    assert run_and_gather(lambda: {0: "done"}) == [{0: "done"}]


def test_a_process_alone_raises_its_own_error():
    """Ranks of a process group gather their failures (tests/integration/test_federated_runs.py); alone, a process
    raises the error itself."""
    def work():
        raise KeyError("subtask 3 exploded")

    with pytest.raises(KeyError, match="subtask 3 exploded"):
        run_and_gather(work)


def make_subtask(class_ids, seed, **decoder_kwargs):
    torch.manual_seed(seed)
    store = GaussianLatentStore(class_ids, num_classes=5, latents_per_class=2, latent_dim=8,
                                class_names=list("abcde"))
    decoder = D3Decoder(latent_dim=8, resolution=8, out_channels=1, channels=[8, 4], **decoder_kwargs).eval()
    with torch.no_grad():
        store.soft_labels.copy_(torch.rand(store.soft_labels.shape).softmax(1))
        decoder.generators[0].body[1].running_mean.uniform_(-1, 1)
    return store, decoder


def test_aggregate_keeps_every_subtask_as_it_was():
    # single-generator decoders, as run.build_decoder makes them (num_subtasks given explicitly)
    (s0, d0), (s1, d1) = make_subtask([0, 1, 2], 0, num_subtasks=1), make_subtask([3, 4], 1, num_subtasks=1)
    store, decoder = aggregate([s0, s1], [d0, d1])
    assert store.config.class_ids == [0, 1, 2, 3, 4] and list(store.config.subtask_sizes) == [3, 2]
    assert store.class_names == list("abcde") and decoder.config.num_subtasks == 2
    assert store.component_subtask.tolist() == [0] * 6 + [1] * 4
    assert torch.equal(store.mean, torch.cat([s0.mean, s1.mean]))
    assert torch.equal(store.logvar, torch.cat([s0.logvar, s1.logvar]))
    assert torch.equal(store.soft_labels, torch.cat([s0.soft_labels, s1.soft_labels]))

    # the aggregated pipeline draws exactly what each subtask's own pipeline draws
    pipe = D3Pipeline(latent_store=store, decoder=decoder)
    mean_images = pipe(include_means=True, num_samples_per_component=0, output_type="pt").images
    for sub, (s, d) in zip((slice(0, 6), slice(6, 10)), ((s0, d0), (s1, d1)), strict=True):
        own = D3Pipeline(latent_store=s, decoder=d)(include_means=True, num_samples_per_component=0,
                                                    output_type="pt").images
        assert torch.allclose(mean_images[sub], own, atol=1e-6)


def test_aggregate_decoders_built_with_default_settings():
    (s0, d0), (s1, d1) = make_subtask([0, 1, 2], seed=0), make_subtask([3, 4], seed=1)
    _, decoder = aggregate([s0, s1], [d0, d1])
    assert decoder.config.num_subtasks == 2 and len(decoder.generators) == 2
    assert torch.equal(decoder.generators[1].project.weight, d1.generators[0].project.weight)


def test_aggregate_keeps_the_runs_label_top_k_whatever_the_subtasks_were_saved_with():
    (s0, d0), (s1, d1) = make_subtask([0, 1, 2], 0, num_subtasks=1), make_subtask([3, 4], 1, num_subtasks=1)
    store, _ = aggregate([s0, s1], [d0, d1], label_top_k=2)
    assert store.config.label_top_k == 2 and (store.soft_labels > 0).sum(1).tolist() == [2] * 10
    whole, _ = aggregate([s0, s1], [d0, d1])
    assert whole.config.label_top_k is None and torch.equal(whole.soft_labels, torch.cat([s0.soft_labels,
                                                                                          s1.soft_labels]))
