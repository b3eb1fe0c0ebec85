"""Print the sizes a config gets and the storage they take, in a second and before any training:
`python recipes/plan.py --resolution 28 --channels 1 --num_classes 10 --storage_budget_ipc 2`.

Takes the same config and overrides as `recipes/distill.py`; `--num_classes N` skips reading the dataset.
"""

import argparse

from hf_d3.config import PAPER_SIZES, parse_config
from hf_d3.data import class_names_of
from hf_d3.factories import planned_storage
from hf_d3.federated import plan_subtasks
from hf_d3.sizing import resolve_sizes
from hf_d3.teacher import resolve_hard_label_weight

NUM_CLASSES_HELP = "the class count (default: the dataset's, read from its metadata)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, add_help=False)  # the config parser's --help lists the rest
    parser.add_argument("--num_classes", type=int, default=None, help=NUM_CLASSES_HELP)
    args, config_args = parser.parse_known_args()
    if {"-h", "--help"} & set(config_args):
        print(f"plan.py's own option:\n  --num_classes N  {NUM_CLASSES_HELP}\nand every option of the config:")
    config = parse_config(config_args)
    num_classes = args.num_classes or len(class_names_of(config.data))
    chosen = config.representation.chosen_by_budget
    config = resolve_sizes(config, num_classes)
    plan = plan_subtasks(list(range(num_classes)), config.run.num_subtasks)
    storage = planned_storage(config, plan)
    given_weight = config.relabel.hard_label_weight is not None
    config = resolve_hard_label_weight(config, storage.ipc_equivalent)

    data, sizes = config.data, config.representation
    print(f"{num_classes} classes of {data.channels}x{data.resolution}x{data.resolution}, {len(plan)} subtask(s); "
          f"sizes {'chosen from the budget' if chosen else 'as given'}:")
    for name in PAPER_SIZES:
        print(f"  {name}: {getattr(sizes, name)}")
    print(f"storage: {storage.total_values:,} values ({storage.total_bytes:,} bytes) = "
          f"{storage.ipc_equivalent:.2f} IPC-equivalent (budget {sizes.storage_budget_ipc})")
    for part in ("decoder", "latent", "label"):
        values = getattr(storage, f"{part}_values")
        print(f"  {part}s: {values:,} values ({100 * values / storage.total_values:.1f} %)")
    chosen_from = f"the budget of {sizes.storage_budget_ipc}" if sizes.storage_budget_ipc else "the storage"
    print(f"labels: hard_label_weight {config.relabel.hard_label_weight:.2f} "
          f"({'as given' if given_weight else 'chosen from ' + chosen_from})")


if __name__ == "__main__":
    main()
