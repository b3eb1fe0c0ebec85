"""Issue 23: how far bf16 autocast moves the trajectory-matching loss and its gradients from float32, on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/mtt_precision.py [--draws 3]

The work of `mtt_iteration.py` (CIFAR-10 shape, 20 Gaussians, 10 unrolled steps, ConvNet-D3 width 128, the small
decoder). For each draw of latents and noise, the loss and the gradients of the means, log-variances, decoder and
learnable lr are computed four ways: all float32; the decoder in bf16 autocast and the unroll in float32 (what
`trajectory_matching_loss` does under autocast); the decoder in float32 and the unroll in bf16; and everything in
bf16 autocast. Printed and
written to benchmarks/results/mtt_precision.json: the relative error of the loss, and for each gradient the
relative error of its norm-2 difference and its cosine with the float32 one.
"""

import argparse
import json

import torch
from mtt_iteration import reference_work  # this folder is on sys.path when the script runs
from record import save_record

from hf_d3.distill.losses import FlatModel, sgd_step, trajectory_matching_loss

MODES = ("decoder_bf16", "unroll_bf16", "all_bf16")


def unroll_in_autocast(net, start, target, batches, syn_lr):
    """The unroll with no float32 opt-out: every step's ops in bf16 where autocast casts them."""
    params = start.clone().requires_grad_(True)
    for images, labels in batches:
        params = sgd_step(net, params, images, labels, syn_lr)
    return (params - target).pow(2).sum() / (start - target).pow(2).sum()


def loss_and_grads(mode: str, store, decoder, net, trajectory, components, noise, labels):
    """The MTT loss and its gradients in `mode`: fp32, decoder_bf16, unroll_bf16 (decoder float32) or all_bf16."""
    syn_lr = torch.tensor(0.01, requires_grad=True)
    for p in [*store.parameters(), *decoder.parameters()]:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode in ("decoder_bf16", "all_bf16")):
        batches = [(decoder(store.sample(c, noise=z)[0]), labels[c]) for c, z in zip(components, noise)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
        unroll = unroll_in_autocast if mode in ("unroll_bf16", "all_bf16") else trajectory_matching_loss
        loss = unroll(net, trajectory[0], trajectory[2], batches, syn_lr)
        loss.backward()  # under autocast on purpose: the all-bf16 case casts the backward's ops too
    flat_decoder = torch.cat([p.grad.flatten() for p in decoder.parameters()])
    return loss.item(), {"mean": store.mean.grad.clone(), "logvar": store.logvar.grad.clone(),
                         "decoder": flat_decoder, "syn_lr": syn_lr.grad.reshape(1).clone()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    expert, trajectory, store, decoder = reference_work()
    net, labels = FlatModel(expert), torch.arange(20) // 2
    generator = torch.Generator().manual_seed(0)
    rows = []
    for draw in range(args.draws):
        components = torch.stack([torch.randperm(20, generator=generator) for _ in range(10)])
        noise = torch.randn(10, 20, 64, generator=generator)
        state = decoder.state_dict()  # BatchNorm running stats move in train mode: start each mode alike
        results = {}
        for mode in ("fp32", *MODES):
            decoder.load_state_dict(state)
            results[mode] = loss_and_grads(mode, store, decoder, net, trajectory, components, noise, labels)
        ref_loss, ref = results["fp32"]
        for mode in MODES:
            loss, grads = results[mode]
            row = {"draw": draw, "mode": mode, "loss_fp32": ref_loss, "loss": loss,
                   "loss_rel_error": abs(loss - ref_loss) / abs(ref_loss)}
            for name, g in grads.items():
                r = ref[name]
                row[f"{name}_grad_rel_error"] = ((g - r).norm() / r.norm()).item()
                cosine = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0)
                row[f"{name}_grad_cosine"] = cosine.item()
            rows.append(row)
            print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}))
    work = ("mtt_iteration.py's: CIFAR-10 shape, 20 Gaussians, 10 unrolled steps, ConvNet-D3 w128, small decoder; "
            "random-perturbation trajectory, start epoch 0, target epoch 2")
    for row in rows:
        save_record("mtt_precision", {"work": work, "mode": row["mode"], "draw": row["draw"]},
                    {k: v for k, v in row.items() if k not in ("mode", "draw")})

if __name__ == "__main__":
    main()
