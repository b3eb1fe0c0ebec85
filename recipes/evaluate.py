"""Evaluate a distilled dataset with the run's student protocol, on the real test split:

    python recipes/evaluate.py outputs/fashion_mnist                  # a run folder: its config.json, its student
    python recipes/evaluate.py outputs/fashion_mnist --eval_seeds 5   # any setting overridden on the command line
    python recipes/evaluate.py user/fmnist-d3 --config recipes/configs/fashion_mnist.yaml   # a pipeline + a config

Settings are `D3Config`'s, parsed as `recipes/distill.py` parses them (YAML + command line); a run folder's
`config.json` is the default config, so the student is the one its `metrics.json` reports unless told otherwise.
The students train on Accelerate's device (a GPU when there is one; `ACCELERATE_USE_CPU=true` keeps them on the CPU)
and in the run's precision (`mixed_precision: bf16` trains them in bf16 autocast, as the run did).
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from hf_d3 import D3Pipeline
from hf_d3.cli import run_recipe
from hf_d3.config_parser import parse_config
from hf_d3.data import load_test_images
from hf_d3.evaluation import evaluate_with_config, pipeline_sampler


def main():
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    source, args = Path(sys.argv[1]), sys.argv[2:]
    is_run = (source / "config.json").is_file() and (source / "pipeline").is_dir()
    if is_run and "--config" not in args:
        args = ["--config", str(source / "config.json"), *args]
    config = parse_config(args)
    accelerator = Accelerator(mixed_precision=config.run.mixed_precision)
    device = accelerator.device
    if (source / "config.json").is_file() and not is_run and not (source / "model_index.json").is_file():
        sys.exit(f"{source} is a run folder without pipeline/: the run has not finished (rerun it to finish it)")
    try:
        pipe = D3Pipeline.from_pretrained(source / "pipeline" if is_run else sys.argv[1]).to(device)
    except Exception as error:  # a mistyped folder is tried as a Hub repo id: say both
        local = "a folder without one" if source.exists() else "no such local path"
        sys.exit(f"no D3 pipeline at {sys.argv[1]!r}: {local}, and as a Hub repo id: {type(error).__name__}: {error}")
    decoder = pipe.decoder.config
    if (config.data.resolution, config.data.channels) != (decoder.resolution, decoder.out_channels):
        sys.exit(f"the config reads the test split at resolution={config.data.resolution}, channels="
                 f"{config.data.channels}, but the pipeline makes {decoder.out_channels}x{decoder.resolution}x"
                 f"{decoder.resolution} images: pass --resolution {decoder.resolution} --channels "
                 f"{decoder.out_channels}, or the run's config")
    test, num_classes = load_test_images(config.data), pipe.latent_store.config.num_classes
    if len(test.class_names) != num_classes:
        sys.exit(f"the pipeline has {num_classes} classes but the test split of dataset={config.data.dataset!r} has "
                 f"{len(test.class_names)}: pass the run's --dataset, or the run's config")
    with accelerator.autocast():
        result = evaluate_with_config(config.evaluation, config.experts, pipeline_sampler(pipe),
                                      test.images.to(device), test.labels.to(device), num_classes)
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    run_recipe(main)
