"""Issue 3 benchmark (partial): a finished run's D3 pipeline against R+H and R+S at the same storage, every
student trained for the same number of optimiser steps, mean +- std over seeds.

    python benchmarks/compare_baselines.py outputs/fashion_mnist [--steps 600 --seeds 3 --temperature 4]

R+H / R+S use the largest number of real images per class whose images + labels fit in the D3 pipeline's
stored values. R+S labels come from the run's teacher (expert 0 of subtask 0) at `--temperature`.
"""

import argparse
import json
from pathlib import Path

import torch

from hf_d3 import D3Pipeline
from hf_d3.baselines import largest_ipc_within, random_real_sampler
from hf_d3.config import D3Config
from hf_d3.data import load_image_dataset, to_tensors
from hf_d3.evaluation import evaluate_sampler, pipeline_sampler
from hf_d3.experts import load_trajectory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=4.0)
    args = parser.parse_args()
    run = Path(args.run_dir)
    config = D3Config(**json.loads((run / "config.json").read_text()))
    pipe = D3Pipeline.from_pretrained(run / "pipeline")
    report = pipe.storage_report()
    train = to_tensors(load_image_dataset(config.dataset, config.train_split), config.resolution, config.channels)
    test = to_tensors(load_image_dataset(config.dataset, config.test_split), config.resolution, config.channels)
    model, trajectory = load_trajectory(run / "subtasks" / "subtask_0" / "experts" / "expert_0.safetensors")
    torch.nn.utils.vector_to_parameters(trajectory[-1], model.parameters())
    n = report.num_classes
    ipc_hard = largest_ipc_within(report.total_values, n, report.values_per_image, soft_labels=False)
    ipc_soft = largest_ipc_within(report.total_values, n, report.values_per_image, soft_labels=True)
    methods = {
        f"D3 ({report.total_values:,} values)": pipeline_sampler(pipe),
        f"R+H ({ipc_hard} img/class)": random_real_sampler(train.images, train.labels, n, ipc_hard),
        f"R+S ({ipc_soft} img/class, T={args.temperature:g})": random_real_sampler(
            train.images, train.labels, n, ipc_soft, teacher=model, temperature=args.temperature),
    }
    for name, sampler in methods.items():
        m = evaluate_sampler(sampler, test.images, test.labels, n, config.eval_architecture, args.steps,
                             config.eval_batch_size, config.eval_lr, config.eval_augment, args.seeds,
                             width=config.net_width, depth=config.net_depth)
        print(f"{name}: {100 * m['accuracy_mean']:.2f} +- {100 * m['accuracy_std']:.2f} % "
              f"({args.seeds} seeds, {args.steps} steps) {[round(100 * a, 2) for a in m['accuracies']]}", flush=True)


if __name__ == "__main__":
    main()
