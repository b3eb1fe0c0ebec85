"""Relabelling by the teacher (`hf_d3.teacher`): its softmax at a temperature, the class mixed in at the hard-label
weight, and a teacher of another label space refused."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_RUN, make_net, make_store_and_decoder, tiny_plan

from hf_d3.config import D3Config
from hf_d3.teacher import hard_label_weight_for, relabel, teacher_labels


def test_relabel_gives_the_teachers_softmax():
    store, decoder = make_store_and_decoder()
    torch.manual_seed(1)
    teacher = make_net().eval()
    relabel(store, decoder, teacher, temperature=2.0)
    with torch.no_grad():
        expected = (teacher(decoder.eval()(store.mean)).logits / 2.0).softmax(1)
    assert torch.allclose(store.soft_labels, expected, atol=1e-6)
    assert torch.allclose(store.soft_labels.sum(1), torch.ones(8))
    sharp = store.soft_labels.clone()
    relabel(store, decoder, teacher, temperature=20.0)
    entropy = lambda p: -(p * p.log()).sum(1)  # noqa: E731
    assert (entropy(store.soft_labels) > entropy(sharp)).all()  # a higher temperature gives softer labels


def test_relabel_mixes_the_class_in_at_hard_label_weight():
    store, decoder = make_store_and_decoder()
    torch.manual_seed(1)
    teacher = make_net().eval()
    relabel(store, decoder, teacher, temperature=2.0)
    soft = store.soft_labels.clone()
    one_hot = torch.nn.functional.one_hot(store.component_class, 4).float()
    relabel(store, decoder, teacher, temperature=2.0, hard_label_weight=0.25)
    assert torch.allclose(store.soft_labels, 0.25 * one_hot + 0.75 * soft, atol=1e-6)
    relabel(store, decoder, teacher, temperature=2.0, hard_label_weight=1.0)
    assert torch.equal(store.soft_labels, one_hot)  # the class id alone: the teacher's view drops out
    with pytest.raises(ValueError, match="hard_label_weight=0.5 needs the images' classes"):
        teacher_labels(teacher, decoder(store.mean), hard_label_weight=0.5)


def test_the_hard_label_weight_grows_with_the_storage_and_a_given_one_wins():
    weights = [hard_label_weight_for(b) for b in (0.5, 1, 2, 5, 10, 20, 50, 100)]
    assert weights[:2] == [0.0, 0.0] and weights[-2:] == [1.0, 1.0]  # the teacher's alone, the class's alone
    assert weights == sorted(weights) and 0 < weights[2] < weights[5] < 1
    budgeted = tiny_plan(D3Config.from_dict({**TINY_RUN, "storage_budget_ipc": 10}))
    assert budgeted.hard_label_weight == hard_label_weight_for(10)
    unbudgeted = tiny_plan(D3Config.from_dict(TINY_RUN))  # no budget: the storage its sizes take decides
    assert unbudgeted.hard_label_weight == hard_label_weight_for(unbudgeted.storage.ipc_equivalent)
    given = tiny_plan(D3Config.from_dict({**TINY_RUN, "hard_label_weight": 0.0, "storage_budget_ipc": 50}))
    assert given.hard_label_weight == 0.0


def test_relabel_refuses_a_teacher_of_another_label_space():
    store, decoder = make_store_and_decoder()
    before = store.soft_labels.clone()
    with pytest.raises(ValueError, match="the teacher predicts 10 classes but the dataset has 4"):
        relabel(store, decoder, make_net(num_labels=10), 1.0)
    assert torch.equal(store.soft_labels, before)
