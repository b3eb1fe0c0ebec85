"""Issue 3 benchmark: seconds per distillation iteration at the reference implementation's measured work.

    OMP_NUM_THREADS=1 python benchmarks/mtt_iteration.py [--mmd]

CIFAR-10 shape (32x32 RGB, 10 classes), 20 latents (2 per class), 10 unrolled steps over all 20 decoded
images, ConvNet-D3 width 128, one thread. The reference implementation needs 7.3 s per iteration on this
work, measured at one thread on a machine like this one; the target is half of that. `--mmd` adds the MMD
step (20 samples per class); `--no_onednn` turns oneDNN's convolutions off; `--profile` prints where the time
goes; `--flops` counts one iteration's floating-point operations and times the expert's middle convolution
alone, which bounds how fast the convolutions could go on this machine; `--json` adds CPU seconds per iteration,
each iteration's wall time and the first iteration's trajectory-matching loss (equal, to float tolerance, across
versions of the code: the same work).
"""

import argparse
import contextlib
import dataclasses
import json
import time

import torch
from record import save_record  # this folder is on sys.path when the script runs
from torch.utils.flop_counter import FlopCounterMode

from hf_d3 import D3Decoder, GaussianLatentStore, build_classifier
from hf_d3.config import DistillationConfig
from hf_d3.data import RealImages
from hf_d3.distill import distill_subtask
from hf_d3.experts import flat_parameters


def reference_work() -> tuple[torch.nn.Module, torch.Tensor, GaussianLatentStore, D3Decoder]:
    """The expert, a 4-epoch trajectory of it, the 20 Gaussians and the small decoder, seeded (also used by
    mtt_precision.py)."""
    torch.manual_seed(0)
    expert = build_classifier("convnet", 3, 32, 10, width=128, depth=3)
    start = flat_parameters(expert)
    trajectory = torch.stack([start + 0.01 * e * torch.randn_like(start) for e in range(4)])
    store = GaussianLatentStore(list(range(10)), 10, latents_per_class=2, latent_dim=64)
    decoder = D3Decoder.from_preset("small", resolution=32, out_channels=3)
    return expert, trajectory, store, decoder


def count_flops(real: RealImages, config: DistillationConfig) -> dict[str, float]:
    """GFLOP of one distillation iteration of the reference work, by operator (torch.utils.flop_counter)."""
    expert, trajectory, store, decoder = reference_work()
    with FlopCounterMode(display=False) as counter:
        distill_subtask(store, decoder, real, [(expert, trajectory)], dataclasses.replace(config, iterations=1),
                        torch.Generator().manual_seed(0))
    return {str(op): flops / 1e9 for op, flops in counter.get_flop_counts()["Global"].items()}


def convolution_rate(repeats: int = 20) -> float:
    """GFLOP/s of the expert's 128-to-128 3x3 convolution on 20 images at 16x16, forward, best of `repeats`: about
    the best rate any of the iteration's convolutions reaches here."""
    images, weight = torch.randn(20, 128, 16, 16), torch.randn(128, 128, 3, 3)
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        torch.nn.functional.conv2d(images, weight, padding=1)
        times.append(time.perf_counter() - start)
    return 2 * 20 * 16 * 16 * 128 * 128 * 9 / min(times[3:]) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--mmd", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--no_onednn", action="store_true",
                        help="torch's own convolutions instead of oneDNN's (torch.backends.mkldnn off)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's operators by self CPU time over all iterations")
    parser.add_argument("--flops", action="store_true",
                        help="also count one iteration's GFLOP and time one convolution alone (the floor they set)")
    args = parser.parse_args()
    torch.backends.mkldnn.enabled = not args.no_onednn
    expert, trajectory, store, decoder = reference_work()
    real = RealImages(torch.rand(500, 3, 32, 32), torch.arange(10).repeat_interleave(50), list(range(10)))
    config = DistillationConfig(
        iterations=args.iterations, mtt_weight=1.0, mmd_weight=1.0 if args.mmd else 0.0, syn_steps=10,
        expert_epochs=2, max_start_epoch=2, syn_batch_size=None, lr_latents=1e-3, lr_decoder=1e-4, lr_lr=1e-6,
        syn_lr_init=1e-2, mmd_samples_per_class=20, mmd_bandwidths=[1, 2, 4, 8, 16], checkpoint_every=10**9,
    )
    marks = [(time.perf_counter(), time.process_time())]  # wall and CPU time at the start and after each iteration

    def mark(iteration: int, losses: dict[str, float]) -> None:
        marks.append((time.perf_counter(), time.process_time()))
        first_losses.setdefault("mtt", losses.get("mtt"))

    first_losses: dict[str, float] = {}
    with torch.profiler.profile() if args.profile else contextlib.nullcontext() as profiler:
        distill_subtask(store, decoder, real, [(expert, trajectory)], config, torch.Generator().manual_seed(0),
                        on_log=mark, log_every=1)
    seconds = (marks[-1][0] - marks[0][0]) / args.iterations
    cpu = (marks[-1][1] - marks[0][1]) / args.iterations
    # CPU time is what a busy neighbour core changes least (it still slows memory); each iteration's wall time shows
    # the first one's warm-up
    walls = [round(b[0] - a[0], 3) for a, b in zip(marks, marks[1:])]
    print(f"threads {torch.get_num_threads()}, terms {'MTT+MMD' if args.mmd else 'MTT'}: "
          f"{seconds:.2f} s per iteration ({args.iterations} iterations; reference 7.3 s for MTT)")
    if args.profile:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    figures = {"seconds_per_iteration": round(seconds, 3), "cpu_seconds_per_iteration": round(cpu, 3),
               "iteration_wall_s": walls, "first_mtt_loss": first_losses.get("mtt")}
    if args.flops:
        gflop, rate = count_flops(real, config), convolution_rate()
        convolutions = sum(v for op, v in gflop.items() if "convolution" in op)
        print(f"{sum(gflop.values()):.1f} GFLOP per iteration ({convolutions:.1f} in convolutions): "
              f"{sum(gflop.values()) / seconds:.1f} GFLOP/s; one convolution alone runs at {rate:.1f} GFLOP/s, so the "
              f"convolutions need at least {convolutions / rate:.2f} s per iteration here")
        figures |= {"gflop_per_iteration": {op: round(v, 3) for op, v in gflop.items()},
                    "convolution_alone_gflop_per_s": round(rate, 1)}
    if args.json:
        print(json.dumps(figures))
    save_record("mtt_iteration", {"terms": "MTT + MMD" if args.mmd else "MTT only", "iterations": args.iterations,
                                  "onednn": not args.no_onednn, "threads": torch.get_num_threads()}, figures)


if __name__ == "__main__":
    main()
