"""The evaluation (`hf_d3.evaluation`): the soft cross-entropy, the epoch batches, a pipeline as a sampler, and
seeded students."""

from __future__ import annotations

import pytest
import torch
from conftest import make_net, make_store_and_decoder
from torch import nn

from hf_d3 import D3Pipeline
from hf_d3.evaluation import epoch_batches, evaluate_sampler, pipeline_sampler, soft_cross_entropy, train_student


def test_soft_cross_entropy_of_one_hot_labels_is_cross_entropy():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 3, 1, 1, 2, 0])
    assert soft_cross_entropy(logits, torch.eye(4)[labels]).item() == pytest.approx(
        nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize("num_images, sizes", [(2320, [232] * 10), (400, [200, 200]), (80, [80]), (257, [129, 128]),
                                               (512, [256, 256])])
def test_epoch_batches_are_equal_and_cover_the_epoch_once(num_images, sizes):
    batches = epoch_batches(num_images, 256, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == sizes
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(num_images))


def test_pipeline_sampler_and_evaluation(data):
    store, decoder = make_store_and_decoder()
    pipe = D3Pipeline(latent_store=store, decoder=decoder)
    images, targets = pipeline_sampler(pipe)(torch.Generator().manual_seed(0))
    assert images.shape == (16, 1, 16, 16) and targets.shape == (16, 4)  # 8 means + 8 samples, soft labels
    assert torch.equal(targets, store.soft_labels.repeat(2, 1))

    def real_sampler(generator):  # the real data as a sampler: a student must learn something from it
        return data.images, torch.eye(4)[data.labels]

    kwargs = {"architecture": "convnet", "steps": 12, "batch_size": 32, "lr": 0.01, "augment": False, "seeds": 2,
              "width": 8, "depth": 2}
    result = evaluate_sampler(real_sampler, data.images, data.labels, 4, **kwargs)
    assert result.num_eval_runs == 2 and len(result.accuracies) == 2 and result.student_steps == 12
    assert all(0 <= a <= 1 for a in result.accuracies)
    assert result == evaluate_sampler(real_sampler, data.images, data.labels, 4, **kwargs)  # seeded
    # a student depends on its seed alone: seed 1 on its own is the second student of the pair
    later = evaluate_sampler(real_sampler, data.images, data.labels, 4, **{**kwargs, "seeds": 1}, first_seed=1)
    assert later.accuracies == result.accuracies[1:]
    assert result.accuracy_mean > 0.4  # well above the 0.25 of chance after 12 steps on its own training data

    student = train_student(make_net(), real_sampler, steps=3, batch_size=32, augment=True)
    assert student.training
