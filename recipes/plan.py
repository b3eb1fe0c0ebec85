"""Print the sizes a config gets and the storage they take, in a second and before any training:
`python recipes/plan.py --resolution 28 --channels 1 --num_classes 10 --storage_budget_ipc 2`.

Takes the same config and overrides as `recipes/distill.py`; `--num_classes N` skips reading the dataset (and
`--num_train_images N` its size, for the estimate of time and memory). Prints each setting not left at `D3Config`'s
default with where it came from (preset, config, command line, the images).
"""

import argparse

import torch

from hf_d3.cli import run_recipe
from hf_d3.config import PAPER_SIZES
from hf_d3.config_parser import parse_with_sources
from hf_d3.data import class_names_of, load_image_dataset
from hf_d3.estimate import estimate_run
from hf_d3.run_plan import make_plan

NUM_CLASSES_HELP = "the class count (default: the dataset's, read from its metadata)"
NUM_TRAIN_IMAGES_HELP = "the training images (default: the train split's, read)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, add_help=False)  # the config parser's --help lists the rest
    parser.add_argument("--num_classes", type=int, default=None, help=NUM_CLASSES_HELP)
    parser.add_argument("--num_train_images", type=int, default=None, help=NUM_TRAIN_IMAGES_HELP)
    args, config_args = parser.parse_known_args()
    if {"-h", "--help"} & set(config_args):
        print(f"plan.py's own options:\n  --num_classes N  {NUM_CLASSES_HELP}\n  --num_train_images N  "
              f"{NUM_TRAIN_IMAGES_HELP}\nand every option of the config:")
    (config,), sources = parse_with_sources(config_args)
    class_names = [str(c) for c in range(args.num_classes)] if args.num_classes else class_names_of(config.data)
    plan = make_plan(config, class_names, config.run.mixed_precision or "no")

    data, sizes, storage, budget = config.data, plan.sizes, plan.storage, config.representation.storage_budget_ipc
    in_bytes = sizes.budget_unit == "bytes"
    budget_text = "none" if budget is None else f"{budget:g}" + (" in bytes" if in_bytes else "")
    print(f"{len(class_names)} classes of {data.channels}x{data.resolution}x{data.resolution}, {len(plan.subtasks)} "
          f"subtask(s); sizes {'chosen from the budget' if config.representation.chosen_by_budget else 'as given'}:")
    for name in PAPER_SIZES:
        print(f"  {name}: {getattr(sizes, name)}")
    print(f"storage in {sizes.storage_dtype}: {storage.total_values:,} values = {storage.ipc_equivalent:.2f} "
          f"IPC-equivalent (budget {budget_text}); {storage.total_bytes:,} bytes = "
          f"{storage.ipc_equivalent_bytes:.2f} IPC-equivalent in bytes (uint8 images)")
    for part in ("decoder", "latent", "label"):
        values = getattr(storage, f"{part}_values")
        print(f"  {part}s: {values:,} values ({100 * values / storage.total_values:.1f} %)")
    chosen_from = f"the budget of {budget_text}" if budget and not in_bytes else "the storage"
    print(f"labels: hard_label_weight {plan.hard_label_weight:.2f} "
          f"({'as given' if config.relabel.hard_label_weight is not None else 'chosen from ' + chosen_from})")

    print_settings(config, sources)
    num_train_images = args.num_train_images
    if num_train_images is None and not args.num_classes:
        num_train_images = len(load_image_dataset(data.dataset, data.train_split))
    if num_train_images is None:
        print("estimate: give --num_train_images N for one")
        return
    estimate = estimate_run(config, plan, num_train_images)
    phases = ", ".join(f"{phase} {seconds / 60:.1f}" for phase, seconds in estimate.seconds.items())
    print(f"estimate (on {torch.get_num_threads()} core(s); rough, see hf_d3.estimate): "
          f"{estimate.total_seconds / 60:.1f} min ({phases}), peak memory {estimate.peak_bytes / 2**30:.1f} GiB")


def print_settings(config, sources: dict[str, str]):
    """The settings not left at `D3Config`'s defaults, each with where it came from."""
    values = config.to_dict()
    print("settings (the others: D3Config's defaults):")
    for name in sorted(sources, key=list(values).index):
        print(f"  {name}: {values[name]} ({sources[name]})")


if __name__ == "__main__":
    run_recipe(main)
