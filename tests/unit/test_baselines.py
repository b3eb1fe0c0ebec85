import pytest
import torch
from conftest import TINY_RUN

from hf_d3 import build_classifier
from hf_d3.baselines import choose_temperature, distill_prototypes, pick_per_class, random_real_sampler, stored_smaller
from hf_d3.config import D3Config
from hf_d3.data import RealImages
from hf_d3.experts import train_classifier
from hf_d3.storage import largest_ipc_within, prototype_storage, real_image_bytes


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
    _, mixed = random_real_sampler(images, labels, 3, 4, seed=1, teacher=teacher, temperature=4,
                                   hard_label_weight=0.5)(None)
    assert torch.allclose(mixed, 0.5 * hard + 0.5 * soft)  # R+S's labels mix the class in as D3's do


def test_prototype_storage_by_hand_at_a_d3_budget():
    # the demo's D3 budget: 76,699 values for 10 classes of 28x28x1. A prototype with a 10-way soft label stores
    # 784 + 10 = 794 values: 9 per class (71,460) fit, 10 (79,400) do not; with hard labels 9 too (70,650)
    assert largest_ipc_within(76_699, 10, 784, soft_labels=True) == 9
    assert prototype_storage(10, 9, 784, soft_labels=True) == 10 * 9 * (784 + 10) == 71_460
    assert prototype_storage(10, 9, 784, soft_labels=False) == 10 * 9 * (784 + 1) == 70_650


def test_r_plus_s_low_stores_smaller_uint8_images_and_trains_on_them_upsampled():
    images = torch.rand(60, 3, 8, 8)
    labels = torch.arange(3).repeat(20)
    stored = stored_smaller(images, 2)
    assert stored.shape == (60, 3, 4, 4)
    assert torch.allclose(stored[0, 0, 0, 0], (images[0, 0, :2, :2].mean() * 255).round() / 255)  # area, uint8 levels
    assert torch.equal(stored_smaller(images, 1), (images * 255).round() / 255)
    teacher = build_classifier("convnet", 3, 8, 3, width=4, depth=1)
    shown, soft = random_real_sampler(images, labels, 3, 4, seed=1, teacher=teacher, downsample=2)(None)
    assert shown.shape == (12, 3, 8, 8)  # the training side
    picked = images[pick_per_class(labels, 3, 4, seed=1)]
    upsampled = torch.nn.functional.interpolate(stored_smaller(picked, 2), size=(8, 8), mode="bilinear")
    assert torch.allclose(shown, upsampled.clamp(0, 1)) and not torch.allclose(shown, picked, atol=0.05)
    assert torch.allclose(soft.sum(1), torch.ones(12))
    with pytest.raises(ValueError, match="downsample=3 must be a whole divisor of the image side 8"):
        stored_smaller(images, 3)


def test_r_plus_s_low_storage_by_hand():
    # 200 classes of 32x32x3 at 2 IPC-equivalent: 2 * 200 * 3,072 = 1,228,800 values. Full size with a 200-way soft
    # label, 3,272 values a picture: 1 per class (654,400); at half the side 768 + 200 = 968: 6 per class
    # (1,161,600); at a quarter 192 + 200 = 392: 15 per class (1,176,000)
    budget = 2 * 200 * 3 * 32 * 32
    assert [largest_ipc_within(budget, 200, 3 * 32 * 32 // f**2, soft_labels=True) for f in (1, 2, 4)] == [1, 6, 15]
    assert prototype_storage(200, 15, 3 * 8 * 8, soft_labels=True) == 200 * 15 * (192 + 200) == 1_176_000


def test_real_images_in_bytes_by_hand():
    # 10 classes x 3 uint8 images of 784 bytes: with int64 class ids 30 * (784 + 8); with 10-way soft labels as D3
    # stores them, float32 30 * (784 + 40), int8 30 * (784 + 10 + a 4-byte scale)
    assert real_image_bytes(10, 3, 784, None) == 30 * 792
    assert real_image_bytes(10, 3, 784, "float32") == 30 * 824
    assert real_image_bytes(10, 3, 784, "float16") == 30 * 804
    assert real_image_bytes(10, 3, 784, "int8") == 30 * 798


def test_a_tiny_prototype_distillation(fmnist4_tensors):
    data = RealImages(fmnist4_tensors.images, fmnist4_tensors.labels, [0, 1, 2, 3])
    torch.manual_seed(0)
    net = build_classifier("convnet", 1, 16, 4, width=8, depth=2)
    trajectory = torch.stack(train_classifier(net, data.images, data.labels, epochs=2, lr=0.01, batch_size=32,
                                              generator=torch.Generator().manual_seed(0), augment=False))
    config = D3Config.from_dict({**TINY_RUN, "iterations": 3, "lr_latents": 0.5}).distillation
    start = data.images[pick_per_class(data.labels, 4, 2, seed=0)]  # 2 real images per class

    def run():
        return distill_prototypes(start, data, [(net, trajectory)], config, torch.Generator().manual_seed(0))

    prototypes, stats = run()
    assert stats["iterations_run"] == 3 and prototypes.shape == start.shape
    assert 0 <= prototypes.min() and prototypes.max() <= 1 and not torch.equal(prototypes, start)
    assert torch.equal(run()[0], prototypes)  # seeded
    one_each = distill_prototypes(start[::2], data, [(net, trajectory)], config, torch.Generator().manual_seed(0))
    assert torch.isfinite(one_each[0]).all()  # one prototype per class: MMD has no within-set pair


def test_choose_temperature_takes_the_best_score_and_measures_nothing_known_again():
    measured = []

    def score_at(t):
        measured.append(t)
        return {0.5: 0.31, 2.0: 0.2}[t]

    best, scores = choose_temperature(score_at, [0.5, 1.0, 2.0], known={"1.0": 0.4})
    assert measured == [0.5, 2.0]
    assert (best, scores) == (1.0, {"0.5": 0.31, "1.0": 0.4, "2.0": 0.2})
