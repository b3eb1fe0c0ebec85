"""Students of a finished D3 run relabelled at other `hard_label_weight`s (the teacher's soft labels, the class, or
a mix), with the run's own student settings: what the label rule of `hf_d3.teacher.hard_label_weight_for` was
measured with.

    python benchmarks/label_weight.py --run outputs/curve2/fashion_mnist/ipc50/d3 --weights 0 0.5 1 [--seeds 3]
        [--held_out]

The run's teacher is the one its config names (`teacher`), else its teacher stage (`hf_d3.stages`). The students
are scored on the test split, or with `--held_out` on the held-out tenth of the training split that the curve's
baselines choose their labels on (`hf_d3.baselines.split_held_out` with the run's seed), so that a rule can be
checked without the test split. Prints one line per weight and writes nothing.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification

from hf_d3 import D3Pipeline
from hf_d3.baselines import split_held_out
from hf_d3.config import D3Config
from hf_d3.data import RealImages, load_images, load_split, load_test_images
from hf_d3.evaluation import evaluate_with_config, pipeline_sampler
from hf_d3.stages import teacher_stage
from hf_d3.teacher import relabel


def held_out_images(config: D3Config) -> RealImages:
    """The held-out tenth of the training split (the baselines' choice set), read like the test split."""
    data = config.data
    train = load_images(load_split(data, data.train_split), data.resolution, data.channels,
                        image_column=data.image_column, label_column=data.label_column)
    held_out, _ = split_held_out(len(train.labels), config.run.seed)
    return train.subset(held_out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder (config.json, pipeline/)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--held_out", action="store_true", help="score on held-out training images, not the test split")
    args = parser.parse_args()
    config = D3Config.from_dict(json.loads((args.run / "config.json").read_text()))
    pipe = D3Pipeline.from_pretrained(args.run / "pipeline")
    precision = config.run.mixed_precision or "no"
    stage_dir = Path(config.run.stage_dir or args.run)  # a run's config.json names its own output_dir
    teacher = AutoModelForImageClassification.from_pretrained(
        config.relabel.teacher or teacher_stage(config, precision).folder(stage_dir))
    test = held_out_images(config) if args.held_out else load_test_images(config.data)
    store = pipe.latent_store
    agree = (store.soft_labels.argmax(1) == store.component_class).float().mean().item()
    print(f"{args.run}: {store.num_components} Gaussians; the saved labels' largest entry is the Gaussian's class "
          f"for {100 * agree:.1f} % of them (saved at hard_label_weight {config.relabel.hard_label_weight or 0}); "
          f"scored on {len(test.labels)} {'held-out training' if args.held_out else 'test'} images")
    for weight in args.weights:
        relabel(store, pipe.decoder, teacher, config.relabel.relabel_temperature, weight)
        result = evaluate_with_config(config.evaluation, config.experts, pipeline_sampler(pipe), test.images,
                                      test.labels, len(test.class_names), seeds=args.seeds)
        accuracies = 100 * torch.tensor(result.accuracies)
        print(f"hard_label_weight {weight:g}: {accuracies.mean():.2f} +- {100 * result.accuracy_std:.2f} % "
              f"({', '.join(f'{a:.2f}' for a in accuracies.tolist())})", flush=True)


if __name__ == "__main__":
    main()
