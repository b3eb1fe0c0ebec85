"""`hf_d3.estimate` from settings alone (its factors against a real run: tests/integration/test_estimate.py)."""

from __future__ import annotations

import dataclasses

import pytest

from hf_d3.config_parser import parse_config
from hf_d3.estimate import estimate_run
from hf_d3.run_plan import make_plan
from hf_d3.sizing import resolve_sizes


@pytest.mark.parametrize("num_subtasks", [2, 4])
def test_k_subtasks_of_the_same_sizes_split_the_work_of_one_but_each_unrolls_its_own_batch(num_subtasks):
    # the same Gaussians, split into K subtasks, each decoded by its own generator of the same sizes and matched
    # against its own experts, which train on its classes alone: the same work in K pieces, but that each subtask's
    # iterations unroll `syn_batch_size` images of its own
    names = [str(c) for c in range(8)]
    one = resolve_sizes(parse_config(["--resolution", "32", "--channels", "3", "--storage_budget_ipc", "2",
                                      "--decoder_max_width", "16"]), len(names))
    split = dataclasses.replace(one, run=dataclasses.replace(one.run, num_subtasks=num_subtasks),
                                representation=dataclasses.replace(one.representation, storage_budget_ipc=None))
    whole, federated = (estimate_run(c, make_plan(c, names, "no"), num_train_images=800) for c in (one, split))
    phases = {phase for phase in whole.seconds if phase != "distillation"}
    assert {p: federated.seconds[p] for p in phases} == pytest.approx({p: whole.seconds[p] for p in phases})
    assert whole.seconds["distillation"] < federated.seconds["distillation"]
