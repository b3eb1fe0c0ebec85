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


def test_relabel_in_parts_gives_the_labels_of_one_batch(monkeypatch):
    import hf_d3.teacher

    store, decoder = make_store_and_decoder()
    torch.manual_seed(1)
    teacher = make_net().eval()
    relabel(store, decoder, teacher, hard_label_weight=0.25)
    whole = store.soft_labels.clone()
    monkeypatch.setattr(hf_d3.teacher, "DECODE_PART", 3)  # 8 components: parts of 3, 3 and 2
    store.soft_labels.zero_()
    relabel(store, decoder, teacher, hard_label_weight=0.25)
    assert torch.allclose(store.soft_labels, whole, atol=1e-6)


def test_decoder_statistics_refreshed_in_parts_are_those_of_one_batch(monkeypatch):
    """Equal parts: their batch means average to the batch mean of all (exactly at the first norm; after it, each
    part was normalised by its own statistics), the variances nearly (the spread within parts)."""
    import hf_d3.distill.distiller as distiller

    store, decoder = make_store_and_decoder()
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    running = []
    for part in (512, 4):  # 8 components: one batch, then two of 4
        monkeypatch.setattr(distiller, "DECODE_PART", part)
        distiller.refresh_batchnorm(decoder, store, passes=1, generator=torch.Generator().manual_seed(0))
        running.append([(n.running_mean.clone(), n.running_var.clone()) for n in norms])
    assert torch.allclose(running[1][0][0], running[0][0][0], atol=1e-6)
    for (mean, var), (mean_parts, var_parts) in zip(*running):
        assert torch.allclose(mean_parts, mean, atol=1e-3)
        assert torch.allclose(var_parts, var, rtol=0.5)
    assert not decoder.training


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


def test_top_k_labels_keep_the_k_largest_of_the_mixed_label_renormalised():
    store, decoder = make_store_and_decoder()
    torch.manual_seed(1)
    teacher = make_net().eval()
    images = decoder.eval()(store.mean).detach()
    whole = teacher_labels(teacher, images, 2.0, store.component_class, 0.25)
    top_2 = teacher_labels(teacher, images, 2.0, store.component_class, 0.25, label_top_k=2)
    kept = whole.topk(2, dim=1)
    assert (top_2 > 0).sum(1).tolist() == [2] * 8
    assert torch.allclose(top_2.gather(1, kept.indices), kept.values / kept.values.sum(1, keepdim=True))
    assert torch.allclose(teacher_labels(teacher, images, 2.0, label_top_k=4), teacher_labels(teacher, images, 2.0))


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
