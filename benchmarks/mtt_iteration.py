"""Issue 3 benchmark: seconds per distillation iteration at the reference implementation's measured work.

    OMP_NUM_THREADS=1 python benchmarks/mtt_iteration.py [--mmd]

CIFAR-10 shape (32x32 RGB, 10 classes), 20 latents (2 per class), 10 unrolled steps over all 20 decoded
images, ConvNet-D3 width 128, one thread. The reference implementation needs 7.3 s per iteration on this
work, measured at one thread on a machine like this one; the target is half of that. `--mmd` adds the MMD
step (20 samples per class).
"""

import argparse
import time

import torch

from hf_d3 import D3Decoder, GaussianLatentStore, build_classifier
from hf_d3.config import DistillationConfig
from hf_d3.data import SubtaskData
from hf_d3.distill import distill_subtask
from hf_d3.experts import flat_parameters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--mmd", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    expert = build_classifier("convnet", 3, 32, 10, width=128, depth=3)
    start = flat_parameters(expert)
    trajectory = torch.stack([start + 0.01 * e * torch.randn_like(start) for e in range(4)])
    store = GaussianLatentStore(list(range(10)), 10, latents_per_class=2, latent_dim=64)
    decoder = D3Decoder.from_preset("small", resolution=32, out_channels=3)
    real = SubtaskData(torch.rand(500, 3, 32, 32), torch.arange(10).repeat_interleave(50), list(range(10)))
    config = DistillationConfig(
        iterations=args.iterations, mtt_weight=1.0, mmd_weight=1.0 if args.mmd else 0.0, syn_steps=10,
        expert_epochs=2, max_start_epoch=2, syn_batch_size=None, lr_latents=1e-3, lr_decoder=1e-4, lr_lr=1e-6,
        syn_lr_init=1e-2, mmd_samples_per_class=20, mmd_bandwidths=[1, 2, 4, 8, 16], checkpoint_every=10**9,
    )
    began = time.perf_counter()
    distill_subtask(store, decoder, real, [(expert, trajectory)], config, torch.Generator().manual_seed(0))
    seconds = (time.perf_counter() - began) / args.iterations
    print(f"threads {torch.get_num_threads()}, terms {'MTT+MMD' if args.mmd else 'MTT'}: "
          f"{seconds:.2f} s per iteration ({args.iterations} iterations; reference 7.3 s for MTT)")


if __name__ == "__main__":
    main()
