"""Issue 23: host time of the MMD term's draw of real images per iteration, at a subtask of ImageNet's size.

    OMP_NUM_THREADS=1 python benchmarks/mmd_draw.py [--classes 500] [--per_class 1300] [--samples 12]

`real_per_class` runs on the host every iteration, before the MMD's device work is queued, so on a GPU its time
adds to each iteration's. Times it (first call, which finds each class's indices once, then the median of later
calls) against the former way, one pass over all labels per class, and checks that both draw the same images.
Then times the conversion of the drawn images (uint8 64x64 RGB) to float32 on the host, which a GPU run made before
the cache moved them to the device while still uint8 (and copied four times the bytes).
"""

import argparse
import statistics
import time

import numpy as np
import torch

from hf_d3.cached_images import to_float
from hf_d3.data import RealImages
from hf_d3.distill.losses import real_per_class


def per_class_passes(labels: torch.Tensor, classes: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """The draw as it was before: a `nonzero` and a `sum` over all labels for every class."""
    return torch.cat([torch.nonzero(labels == c).flatten()[
        torch.randint(int((labels == c).sum()), (samples,), generator=generator)] for c in range(classes)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=500, help="classes of the subtask (imagenet_64_ipc2: 500)")
    parser.add_argument("--per_class", type=int, default=1300, help="training images per class (ImageNet: ~1,300)")
    parser.add_argument("--samples", type=int, default=12, help="mmd_samples_per_class (imagenet_64_ipc2: 12)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    shuffle = torch.randperm(args.classes * args.per_class, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)[shuffle]
    data = RealImages(torch.empty(len(labels), 0), labels, list(range(args.classes)))

    def timed(draw) -> tuple[list[float], torch.Tensor]:
        """Each call's seconds, and the first call's draw."""
        generator, seconds, draws = torch.Generator().manual_seed(0), [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            draws.append(draw(generator))
            seconds.append(time.perf_counter() - start)
        return seconds, draws[0]

    new, new_first = timed(lambda g: real_per_class(data, args.samples, g))
    old, old_first = timed(lambda g: per_class_passes(labels, args.classes, args.samples, g))
    print(f"{args.classes} classes x {args.per_class} images, {args.samples} drawn per class: real_per_class "
          f"{new[0]:.4f} s the first time, then {statistics.median(new[1:]):.4f} s; one pass per class "
          f"{statistics.median(old):.4f} s; same images drawn: {torch.equal(new_first, old_first)}")
    drawn = np.random.default_rng(0).integers(0, 256, (len(new_first), 64, 64, 3), dtype=np.uint8)
    convert = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        to_float(drawn)
        convert.append(time.perf_counter() - start)
    print(f"converting those {len(drawn)} images to float32 on the host: {statistics.median(convert):.3f} s "
          f"(median of {args.repeats}); {drawn.nbytes / 2**20:.0f} MiB as uint8, {4 * drawn.nbytes / 2**20:.0f} MiB "
          "as float32")


if __name__ == "__main__":
    main()
