"""Issue 23: what was tried to speed up the trajectory-matching unroll on the CPU, each against the code as it is.

    OMP_NUM_THREADS=1 python benchmarks/mtt_variants.py [--repeats 4] [variant ...]

On `mtt_iteration.py`'s reference work, times one trajectory-matching loss and its backward into the images and
the student lr (10 unrolled steps, no decoder) with the expert's layers swapped for:

- `norm`: instance norm written out (mean, variance, rsqrt) instead of `GroupNorm`'s kernels;
- `pool`: 2x2 average pooling as a reshape and a mean instead of `avg_pool2d`;
- `channels_last`: the images in channels-last memory format (oneDNN's native layout) from the first layer on;
- `conv`: a hand-written double backward of the convolution, whose weight term uses oneDNN's weight-gradient
  kernel rather than PyTorch's convolution of batch-transposed tensors;
- `compiled_autograd`: `conv`'s layers, and the outer backward through the unroll compiled by inductor (torch's
  compiled autograd, so that the instance norm's, pooling's and ReLU's double-backward elementwise work is fused).
  PyTorch's own convolution double backward fails under compiled autograd from the second unrolled step on
  (torch 2.13: "add(): argument 'other' must be Tensor, not NoneType"), hence `conv`'s. The warm-up run compiles:
  about 15 minutes here.

Prints the loss and gradient norms (the variants compute the same function: they must agree to float tolerance)
and the best and median seconds of `--repeats` runs after one warm-up, variants interleaved with `base` runs.
"""

import argparse
import contextlib
import time

import torch
from mtt_iteration import reference_work
from torch import nn
from torch.nn import functional as F

from hf_d3.distill.losses import FlatModel, trajectory_matching_loss


class WrittenOutInstanceNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class ReshapeMeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, c, h // 2, 2, w // 2, 2).mean((3, 5))


class ChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def _conv_backward(grad_out, x, weight, padding, mask):
    return torch.ops.aten.convolution_backward(grad_out, x, weight, [weight.shape[0]], [1, 1], [padding] * 2, [1, 1],
                                               False, [0, 0], 1, mask)


class _ConvBackward(torch.autograd.Function):
    """The convolution's backward as a function of (grad_out, x, weight), with its own backward written out."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, padding):
        ctx.save_for_backward(grad_out, x, weight)
        ctx.padding = padding
        return _conv_backward(grad_out, x, weight, padding, [True, True, True])

    @staticmethod
    def backward(ctx, gg_x, gg_weight, gg_bias):
        grad_out, x, weight = ctx.saved_tensors
        p = ctx.padding
        g_grad_out = gg_bias[None, :, None, None].expand_as(grad_out).clone()
        if gg_x is not None:
            g_grad_out += F.conv2d(gg_x, weight, padding=p)
        if gg_weight is not None:
            g_grad_out += F.conv2d(x, gg_weight, padding=p)
        g_x = _conv_backward(grad_out, x, gg_weight, p, [True, False, False])[0] if gg_weight is not None else None
        g_weight = _conv_backward(grad_out, gg_x, weight, p, [False, True, False])[1] if gg_x is not None else None
        return g_grad_out, g_x, g_weight, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        return (*_ConvBackward.apply(grad_out, x, weight, ctx.padding), None)


class HandWrittenDoubleBackwardConv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias, self.padding = conv.weight, conv.bias, conv.padding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Conv.apply(x, self.weight, self.bias, self.padding)


SWAPS = {"norm": (nn.GroupNorm, WrittenOutInstanceNorm), "pool": (nn.AvgPool2d, lambda _: ReshapeMeanPool()),
         "conv": (nn.Conv2d, HandWrittenDoubleBackwardConv),
         "compiled_autograd": (nn.Conv2d, HandWrittenDoubleBackwardConv)}
QUICK_VARIANTS = ["norm", "pool", "channels_last", "conv"]
VARIANTS = [*QUICK_VARIANTS, "compiled_autograd"]


def outer_backward(variant: str) -> contextlib.AbstractContextManager:
    if variant != "compiled_autograd":
        return contextlib.nullcontext()
    from torch._dynamo import compiled_autograd  # private: torch has no public switch for one backward call

    return compiled_autograd._enable(torch.compile(backend="inductor", dynamic=False))


def time_variant(variant: str, repeats: int) -> tuple[float, float, float, float, float]:
    """(loss, images' gradient norm, lr's gradient, best s, median s) of the unroll with `variant`'s layers."""
    expert, trajectory, _, _ = reference_work()
    layers = list(expert.body)
    if variant in SWAPS:
        kind, make = SWAPS[variant]
        layers = [make(m) if isinstance(m, kind) else m for m in layers]
    if variant == "channels_last":
        layers = [ChannelsLast(), *layers]
    expert.body = nn.Sequential(*layers)
    net, generator = FlatModel(expert), torch.Generator().manual_seed(0)
    images = torch.rand(10, 20, 3, 32, 32, generator=generator, requires_grad=True)
    labels, lr = torch.arange(10).repeat(2), torch.tensor(0.01, requires_grad=True)
    seconds = []
    for _ in range(repeats + 1):
        images.grad = lr.grad = None
        start = time.perf_counter()
        loss = trajectory_matching_loss(net, trajectory[0], trajectory[2], list(zip(images, [labels] * 10)), lr)
        with outer_backward(variant):
            loss.backward(inputs=[images, lr])
        seconds.append(time.perf_counter() - start)
    seconds = sorted(seconds[1:])
    return loss.item(), images.grad.norm().item(), lr.grad.item(), seconds[0], seconds[len(seconds) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=QUICK_VARIANTS,
                        help=f"any of {VARIANTS} (default: all but compiled_autograd, which compiles for minutes)")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; valid: {VARIANTS}")
    print(f"threads {torch.get_num_threads()}; one trajectory-matching loss and its backward")
    for variant in [v for name in args.variants for v in ("base", name)] + ["base"]:
        loss, images_grad, lr_grad, best, median = time_variant(variant, args.repeats)
        print(f"{variant:14s} loss {loss:.7f}  |d images| {images_grad:.6e}  d lr {lr_grad:+.6e}  "
              f"best {best:.3f} s  median {median:.3f} s", flush=True)


if __name__ == "__main__":
    main()
