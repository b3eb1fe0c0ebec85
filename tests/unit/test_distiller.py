"""The distillation loop (`hf_d3.distill.distill_subtask`): seeded, bounded by iterations and time, each term
switchable, checkpointed and resumed exactly, and stopped with a checkpoint when a loss diverges."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import TINY_RUN, make_store_and_decoder

from hf_d3 import D3Decoder, GaussianLatentStore
from hf_d3.config import D3Config
from hf_d3.distill import distill_subtask

CONFIG = D3Config.from_dict(TINY_RUN)  # 16x16 grayscale, 2 latents of 8 dims per class, decoder [8, 8, 8]


def distill(data, trajectory, seed=0, checkpoint_dir=None, **overrides):
    store, decoder = make_store_and_decoder(seed)
    config = D3Config.from_dict({**TINY_RUN, **overrides}).distillation
    stats = distill_subtask(store, decoder, data, [trajectory], config, torch.Generator().manual_seed(seed),
                            checkpoint_dir=checkpoint_dir)
    return store, decoder, stats


def test_seeded_distillation_is_deterministic(data, trajectory):
    a_store, a_decoder, a_stats = distill(data, trajectory, iterations=3)
    b_store, b_decoder, b_stats = distill(data, trajectory, iterations=3)
    for (name, a), (_, b) in zip([*a_store.state_dict().items(), *a_decoder.state_dict().items()],
                                 [*b_store.state_dict().items(), *b_decoder.state_dict().items()], strict=True):
        assert torch.equal(a, b), name
    assert a_stats.iterations_wall_time_s > 0 and b_stats.iterations_wall_time_s > 0
    assert replace(a_stats, iterations_wall_time_s=0) == replace(b_stats, iterations_wall_time_s=0)
    assert a_stats.iterations_run == 3
    assert len(a_stats.loss_history["mtt"]) == 3 and len(a_stats.loss_history["mmd"]) == 3
    assert a_stats.syn_lr != CONFIG.distillation.syn_lr_init  # the learnable lr was stepped

    init_store, _ = make_store_and_decoder(0)
    assert not torch.equal(a_store.mean, init_store.mean)  # the latents were trained
    c_store, _, _ = distill(data, trajectory, seed=1, iterations=3)
    assert not torch.equal(c_store.mean, a_store.mean)


def test_a_time_limit_stops_the_iterations(data, trajectory):
    _, _, stats = distill(data, trajectory, iterations=5, max_distill_time_s=0.0)
    assert stats.iterations_run == 0 and stats.loss_history == {"mtt": [], "mmd": []}
    _, _, stats = distill(data, trajectory, iterations=2, max_distill_time_s=600.0)
    assert stats.iterations_run == 2


def test_each_term_can_be_switched_off(data, trajectory):
    _, _, only_mmd = distill(data, trajectory, mtt_weight=0.0)
    assert only_mmd.loss_history["mtt"] == [] and len(only_mmd.loss_history["mmd"]) == 2
    assert only_mmd.syn_lr == pytest.approx(CONFIG.distillation.syn_lr_init)  # never stepped
    _, _, only_mtt = distill(data, trajectory, mmd_weight=0.0)
    assert only_mtt.loss_history["mmd"] == [] and len(only_mtt.loss_history["mtt"]) == 2


def test_checkpoints_are_written_every_n_iterations(data, trajectory, tmp_path):
    store, decoder, _ = distill(data, trajectory, checkpoint_dir=tmp_path, iterations=2, checkpoint_every=1)
    saved = GaussianLatentStore.from_pretrained(tmp_path / "latent_store")
    assert torch.equal(saved.mean, store.mean)  # the last checkpoint is the final latents
    assert D3Decoder.from_pretrained(tmp_path / "decoder").config.latent_dim == 8


def test_an_interrupted_distillation_resumes_exactly(data, trajectory, tmp_path):
    whole_store, whole_decoder, whole = distill(data, trajectory, iterations=4, checkpoint_every=2,
                                                checkpoint_dir=tmp_path / "whole")
    # attempts of 0 -> 1 and 1 -> 2 iterations (each saves its end state), then 2 -> 4 in a fresh process
    distill(data, trajectory, iterations=1, checkpoint_dir=tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "progress.json").read_text())["iterations_run"] == 1
    distill(data, trajectory, iterations=2, checkpoint_dir=tmp_path / "resumed")
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert progress["iterations_run"] == 2

    # other initial latents and decoder, overwritten by the checkpoint
    store, decoder, resumed = distill(data, trajectory, seed=1, iterations=4, checkpoint_every=1,
                                      checkpoint_dir=tmp_path / "resumed")
    for (name, a), (_, b) in zip([*whole_store.state_dict().items(), *whole_decoder.state_dict().items()],
                                 [*store.state_dict().items(), *decoder.state_dict().items()], strict=True):
        assert torch.equal(a, b), name
    assert resumed.iterations_wall_time_s >= progress["iterations_wall_time_s"]  # both attempts count
    assert replace(resumed, iterations_wall_time_s=0) == replace(whole, iterations_wall_time_s=0)
    assert resumed.iterations_run == 4


def test_a_resumed_time_limit_counts_the_earlier_iterations(data, trajectory, tmp_path):
    distill(data, trajectory, iterations=2, checkpoint_every=1, checkpoint_dir=tmp_path)
    spent = json.loads((tmp_path / "progress.json").read_text())["iterations_wall_time_s"]
    _, _, stats = distill(data, trajectory, iterations=10, max_distill_time_s=spent, checkpoint_dir=tmp_path)
    assert stats.iterations_run == 2


@pytest.mark.parametrize("weights, term", [({}, "trajectory matching"), ({"mtt_weight": 0.0}, "MMD")])
def test_nan_loss_stops_with_a_checkpoint(data, trajectory, tmp_path, weights, term):
    store, decoder = make_store_and_decoder()
    with torch.no_grad():
        store.mean[3, 2] = float("nan")
    config = D3Config.from_dict({**TINY_RUN, **weights}).distillation
    with pytest.raises(FloatingPointError) as error:
        distill_subtask(store, decoder, data, [trajectory], config, torch.Generator().manual_seed(0),
                        checkpoint_dir=tmp_path / "checkpoint")
    message = str(error.value)
    assert f"the {term} loss became nan at iteration 0" in message
    assert str(tmp_path / "checkpoint") in message and "Lower the learning rates" in message
    assert json.loads((tmp_path / "checkpoint" / "progress.json").read_text())["iterations_run"] == 0
    saved = GaussianLatentStore.from_pretrained(tmp_path / "checkpoint" / "latent_store")
    assert torch.isnan(saved.mean[3, 2]) and torch.equal(saved.mean.nan_to_num(0.0), store.mean.nan_to_num(0.0))
    assert (tmp_path / "checkpoint" / "decoder" / "config.json").is_file()


def test_diverging_learning_rate_stops(data, trajectory, tmp_path):
    store, decoder = make_store_and_decoder()
    config = D3Config.from_dict({**TINY_RUN, "syn_lr_init": 1e30, "iterations": 3}).distillation
    with pytest.raises(FloatingPointError, match="loss became (nan|inf)"):
        distill_subtask(store, decoder, data, [trajectory], config, torch.Generator().manual_seed(0),
                        checkpoint_dir=tmp_path)
    assert (tmp_path / "latent_store" / "config.json").is_file()
