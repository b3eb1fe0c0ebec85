"""Prototypes distilled to convergence, beside the curve's equal-iteration rows (benchmarks/accuracy_vs_storage.py).

    python benchmarks/converged.py --dataset fashion_mnist --budgets 1 2 --output_dir outputs/curve [--seeds 3]

At the curve's iterations the prototypes barely leave their real-image start, so "D3 beats prototypes" needs
prototypes distilled until they stop improving. Per budget, the prototypes of the curve (same experts, teacher,
objective and start, `accuracy_vs_storage.prototype_set`) are distilled afresh for `MULTIPLES` x the config's
iterations, in order, each scored by one student on the held-out training images, until the held-out accuracy has
not risen by more than `--min_gain` points over the best so far and at least `--at_least` x the iterations have run.
The multiple that scored best is the converged row: its students (`--seeds`) are tested, and the row records every
multiple's held-out accuracy and distillation time. Labels: the teacher's at the hard-label weight and temperature
the curve's prototypes row chose (run the curve's prototypes first); where they change, the multiples distilled so
far are scored again, not distilled again.

The curve's stages are shared (`<out>/<dataset>/shared`), so the experts and teacher are the curve's. Each multiple's
held-out score is kept in `<out>/<dataset>/ipc<B>/converged_prototypes.json` as it is measured (the prototypes in
`converged_prototypes_x<multiple>.safetensors`), so a rerun continues with the next multiple; the converged row is
`row_prototypes-converged.json`, which the curve's table and figure show.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from accuracy_vs_storage import (  # this folder is on sys.path when the script runs
    CONFIGS,
    FIRST_TEMPERATURE,
    Budget,
    base_config,
    held_out_scorer,
    is_done,
    merge_and_plot,
    prepare_shared,
    prototype_sampler,
    prototype_set,
    row_settings,
    same_settings,
    save_row,
    saved_row,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification

from hf_d3.config_parser import parse_config
from hf_d3.data import load_images, load_split, load_test_images
from hf_d3.evaluation import evaluate_with_config

MULTIPLES = (1, 2, 5, 10, 20, 40)


def converged(scores: dict[int, float], at_least: int, min_gain: float) -> bool:
    """Whether the multiples scored so far (held-out accuracy in %, by multiple) show convergence: at least
    `at_least` x the iterations ran and the last did not beat the best before it by more than `min_gain` points."""
    multiples = sorted(scores)
    if len(multiples) < 2 or multiples[-1] < at_least:
        return False
    return scores[multiples[-1]] <= max(scores[m] for m in multiples[:-1]) + min_gain


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="fashion_mnist")
    parser.add_argument("--data_path", type=Path, default=None)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--at_least", type=int, default=10, help="the fewest multiples of the curve's iterations")
    parser.add_argument("--min_gain", type=float, default=0.5, help="held-out points a multiple must add")
    args, overrides = parser.parse_known_args()

    out = args.output_dir / args.dataset
    config_path = base_config(args.dataset, args.data_path, out)
    base = parse_config(["--config", str(config_path), *overrides, "--output_dir", str(out / "shared")])
    data = base.data
    train = load_split(data, data.train_split)
    shared = prepare_shared(base, train)
    teacher = AutoModelForImageClassification.from_pretrained(shared.teacher.folder(shared.stage_dir))
    test = load_test_images(data)
    train_tensors = load_images(train, data.resolution, data.channels, image_column=data.image_column,
                                label_column=data.label_column)
    n = len(test.class_names)
    score = held_out_scorer(base, train_tensors, n)
    for budget in args.budgets:
        budget_of = Budget(budget, base.representation.budget_unit, base.representation.storage_dtype, n,
                           test.images[0].numel(), base.representation.label_top_k)
        folder = out / budget_of.folder_name
        curve_row = saved_row(folder, "prototypes")
        if curve_row is None:
            raise SystemExit(f"{folder} has no prototypes row: run benchmarks/accuracy_vs_storage.py --methods "
                             f"prototypes --budgets {budget:g} first (its label weight is reused)")
        weight, settings = curve_row["row"]["hard_label_weight"], curve_row["settings"]
        labels = {"hard_label_weight": weight, "temperature": curve_row["row"].get("temperature", FIRST_TEMPERATURE)}
        mine = {**base.to_dict(), "hard_label_weight": settings.get("hard_label_weight")}
        if not same_settings(settings, {k: v for k, v in mine.items() if k in settings}):
            raise SystemExit(f"{folder}'s prototypes row was made with other settings than these overrides "
                             f"({overrides}): give the curve's")
        config = dataclasses.replace(base, relabel=dataclasses.replace(base.relabel, hard_label_weight=weight))
        progress_path = folder / "converged_prototypes.json"
        progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
        distilling = {k: v for k, v in settings.items() if k != "label_temperatures"}  # what the prototypes depend on
        if {k: v for k, v in progress.get("settings", {}).items() if k != "label_temperatures"} != distilling:
            progress = {"settings": settings, "multiples": {}}
        if progress.get("labels") != labels:  # the prototypes stand, their scores with other labels do not
            progress = {**progress, "settings": settings, "labels": labels,
                        "multiples": {m: {k: v for k, v in r.items() if k != "held_out_accuracy"}
                                      for m, r in progress["multiples"].items()}}
        scores = {int(m): r["held_out_accuracy"] for m, r in progress["multiples"].items() if "held_out_accuracy" in r}
        for multiple in MULTIPLES:
            if converged(scores, args.at_least, args.min_gain):
                break
            if multiple in scores:
                continue
            path = folder / f"converged_prototypes_x{multiple}.safetensors"
            if str(multiple) in progress["multiples"] and path.is_file():
                prototypes, row = load_file(path)["prototypes"], progress["multiples"][str(multiple)]
            else:
                iterations = multiple * config.distillation.iterations
                distilled = dataclasses.replace(config, distillation=dataclasses.replace(config.distillation,
                                                                                      iterations=iterations))
                start = time.perf_counter()
                prototypes, row = prototype_set(distilled, shared, train, test, budget_of)
                row["distill_wall_time_s"] = time.perf_counter() - start
                save_file({"prototypes": prototypes.contiguous()}, path)
            scores[multiple] = 100 * score(prototype_sampler(config, prototypes, teacher, n, **labels))
            progress["multiples"][str(multiple)] = {**row, "held_out_accuracy": scores[multiple]}
            progress_path.write_text(json.dumps(progress, indent=2))
            print(f"ipc {budget:g}: prototypes x{multiple} ({multiple * config.distillation.iterations} "
                  f"iterations): held-out {scores[multiple]:.2f} %")
        best = max(scores, key=scores.get)
        settings_converged = {**row_settings("prototypes", settings), "multiples": list(MULTIPLES),
                              "at_least": args.at_least, "min_gain": args.min_gain}
        done = saved_row(folder, "prototypes-converged")
        if (is_done(folder, "prototypes-converged", settings_converged) and done["row"]["multiple"] == best
                and done["row"]["hard_label_weight"] == weight
                and done["row"].get("temperature", FIRST_TEMPERATURE) == labels["temperature"]
                and len(done["row"]["accuracies"]) >= args.seeds):
            continue
        prototypes = load_file(folder / f"converged_prototypes_x{best}.safetensors")["prototypes"]
        accuracies = evaluate_with_config(config.evaluation, config.experts,
                                          prototype_sampler(config, prototypes, teacher, n, **labels),
                                          test.images, test.labels, n, seeds=args.seeds).accuracies
        row = {**progress["multiples"][str(best)], "accuracies": accuracies, "multiple": best, **labels,
               "held_out_by_multiple": {str(m): s for m, s in sorted(scores.items())},
               "converged": converged(scores, args.at_least, args.min_gain)}
        key = {"dataset": args.dataset, "budget": f"{budget:g}", "unit": budget_of.unit,
               "storage_dtype": budget_of.storage_dtype, "label_top_k": budget_of.label_top_k,
               "settings": settings_converged}
        save_row(folder, "prototypes-converged", key, row)
    merge_and_plot(args.output_dir, args.output_dir / "accuracy_vs_storage.png")


if __name__ == "__main__":
    main()
