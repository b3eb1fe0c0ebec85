"""A run's wall time and peak memory, estimated from its settings before any work (`recipes/plan.py`).

Time: each phase's work is counted in network FLOPs (`torch.utils.flop_counter` on one image; a training step is
three forwards, an unrolled trajectory-matching step five, for its meta-gradient) and divided by one throughput per
core, calibrated on the demo (benchmarks/results/demo.json: recipes/configs/fashion_mnist.yaml, 694 s on 2 cores),
plus a fixed start-up. Memory: the process's base plus the larger of the unroll, which keeps every unrolled step's
activations for the meta-gradient (docs/method.md), and a training batch. Rough by design: the factor it holds to
on a real run is tested (tests/unit/test_presets.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import D3Config
from .factories import build_decoder, build_net
from .run_plan import RunPlan

FLOPS_PER_CORE_S = 16.5e9  # the demo's counted FLOPs (22.2 TFLOP) over its 694 s less START_S, per core of its 2
START_S = 20.0  # imports, datasets, the image cache of a small dataset, writing the run's folder
BASE_BYTES = 0.8 * 2**30  # torch, datasets and the process's own before any network (the demo: 1.09 GiB at peak)
SAVED_PER_ACTIVATION = 3  # tensors autograd keeps per module output (input, output, normalisation statistics)


@dataclass(frozen=True)
class Estimate:
    """The estimated seconds of each phase and the peak resident bytes of a run."""

    seconds: dict[str, float]
    peak_bytes: float

    @property
    def total_seconds(self) -> float:
        return START_S + sum(self.seconds.values())


def _per_image(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[float, float]:
    """FLOPs of one forward of a single input and the values its modules output."""
    outputs = []
    hooks = [m.register_forward_hook(lambda _, __, out: outputs.append(out.numel())) for m in model.modules()
             if not list(m.children())]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs)
    for hook in hooks:
        hook.remove()
    return float(counter.get_total_flops()), float(sum(outputs))


def estimate_run(config: D3Config, plan: RunPlan, num_train_images: int) -> Estimate:
    """The time and peak memory of `config`'s run by `plan` on `num_train_images` training images, on the cores
    this process may use."""
    data, experts, objective = config.data, config.experts, config.distillation
    num_classes = len(plan.class_names)
    image = torch.zeros(1, data.channels, data.resolution, data.resolution)
    net_flops, net_values = _per_image(build_net(experts, data, num_classes), image)
    student = dataclasses.replace(experts, architecture=config.evaluation.eval_architecture)
    student_flops, _ = _per_image(build_net(student, data, num_classes), image)
    # every subtask's generator has the same sizes, and an image passes through one of them
    decoder_flops, _ = _per_image(build_decoder(plan.sizes, data, 1), torch.zeros(1, plan.sizes.latent_dim))

    used = min(num_train_images, num_classes * (data.max_train_per_class or num_train_images))
    components = [len(classes) * plan.sizes.latents_per_class for classes in plan.subtasks]
    unrolled = [min(objective.syn_batch_size or n, n) for n in components]
    mmd_draws = objective.mmd_samples_per_class * num_classes
    flops = {
        "experts": 3 * net_flops * used * experts.trajectory_epochs * experts.num_experts,
        "warm start": 3 * decoder_flops * sum(components) * objective.init_steps * (objective.init == "real"),
        "distillation": objective.iterations * sum(
            5 * net_flops * objective.syn_steps * b + 3 * decoder_flops * b for b in unrolled)
        + objective.iterations * 3 * (decoder_flops + net_flops) * mmd_draws,
        "teacher": 3 * net_flops * num_train_images * config.relabel.teacher_epochs * (not config.relabel.teacher),
        "students": 3 * student_flops * config.evaluation.eval_batch_size * config.evaluation.eval_steps
        * config.evaluation.eval_seeds,
    }
    cores = torch.get_num_threads()
    seconds = {phase: count / (FLOPS_PER_CORE_S * cores) for phase, count in flops.items()}
    bytes_per_value = 4 * SAVED_PER_ACTIVATION
    unroll = max(unrolled) * objective.syn_steps * net_values * bytes_per_value
    batch = max(experts.expert_batch_size, config.evaluation.eval_batch_size) * net_values * bytes_per_value
    return Estimate(seconds, BASE_BYTES + max(unroll, batch))
