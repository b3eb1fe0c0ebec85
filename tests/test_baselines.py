import torch

from hf_d3 import build_classifier
from hf_d3.baselines import largest_ipc_within, random_real_sampler


def test_largest_ipc_within_counts_images_and_labels():
    # 10 classes of 784-value images: 9 per class with hard labels is 9 * 10 * 785 = 70,650 <= 71,939,
    # 10 per class would be 78,500; with soft labels (10 values each) 9 per class is 71,460.
    assert largest_ipc_within(71_939, 10, 784, soft_labels=False) == 9
    assert largest_ipc_within(71_939, 10, 784, soft_labels=True) == 9
    assert largest_ipc_within(78_500, 10, 784, soft_labels=False) == 10
    assert largest_ipc_within(78_499, 10, 784, soft_labels=False) == 9


def test_random_real_sampler_hard_and_soft_labels():
    images = torch.rand(60, 1, 8, 8)
    labels = torch.arange(3).repeat(20)
    hard_images, hard = random_real_sampler(images, labels, 3, 4, seed=1)(torch.Generator())
    assert hard_images.shape == (12, 1, 8, 8)
    assert torch.equal(hard.sum(1), torch.ones(12)) and set(hard.flatten().tolist()) == {0.0, 1.0}
    assert torch.equal(hard.argmax(1), torch.arange(3).repeat_interleave(4))
    again, _ = random_real_sampler(images, labels, 3, 4, seed=1)(torch.Generator())
    assert torch.equal(again, hard_images)  # the subset is fixed by the seed, the same every epoch

    teacher = build_classifier("convnet", 1, 8, 3, width=4, depth=1)
    soft_images, soft = random_real_sampler(images, labels, 3, 4, seed=1, teacher=teacher, temperature=4)(None)
    assert torch.equal(soft_images, hard_images)
    assert torch.allclose(soft.sum(1), torch.ones(12)) and (soft < 1).all()
