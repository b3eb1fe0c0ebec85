"""Evaluate a saved D3 pipeline (a folder or Hub repo id) with the paper's protocol:
`python recipes/evaluate.py outputs/fashion_mnist/pipeline --dataset builtin:fashion_mnist --seeds 3`."""

import argparse
import json

from hf_d3 import D3Pipeline
from hf_d3.data import load_image_dataset, to_tensors
from hf_d3.evaluation import evaluate_sampler, pipeline_sampler


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pipeline", help="a saved pipeline folder or Hub repo id")
    parser.add_argument("--dataset", default="builtin:fashion_mnist", help="where the real test split comes from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--architecture", default="convnet", choices=["convnet", "resnet18_ap"])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no_augment", action="store_true")
    args = parser.parse_args()

    pipe = D3Pipeline.from_pretrained(args.pipeline)
    decoder = pipe.decoder.config
    test = to_tensors(load_image_dataset(args.dataset, args.split), decoder.resolution, decoder.out_channels)
    metrics = evaluate_sampler(pipeline_sampler(pipe), test.images, test.labels, pipe.latent_store.config.num_classes,
                               args.architecture, args.steps, augment=not args.no_augment, seeds=args.seeds,
                               width=args.width)
    print(json.dumps(metrics.to_dict(), indent=2))


if __name__ == "__main__":
    main()
