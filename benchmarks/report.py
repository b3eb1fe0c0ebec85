"""Write BENCHMARKS.md from the records in benchmarks/results/*.json (the schema: benchmarks/record.py).

    python benchmarks/report.py [--output BENCHMARKS.md]

One table per question: accuracy against storage, speed, scale. Each cell holds one figure and a note number; the
note gives the machine, the command, and the dates and commits of the records it stands for (the records name each
cell's own). Where a question was measured more than once, the latest record answers (the others stay in the JSON
files, and older pages in git). The output depends on the records alone, so a clean checkout regenerates the
committed page byte for byte (tests/contracts/test_benchmarks_report.py).
"""

import argparse
import re
import statistics
from pathlib import Path

from record import RESULTS, load_records

ROOT = RESULTS.parents[1]
DATASETS = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 subset (5,085 train images)",
            "tiny_imagenet": "Tiny ImageNet at 32x32 (CPU protocol: recipes/configs/tinyimagenet_cpu.yaml)"}
METHODS = ("D3", "D3-hand", "prototypes", "prototypes-converged", "R+H", "R+S", "R+S-low")
BASELINES = tuple(m for m in METHODS if not m.startswith("D3"))
PAPER_FORMAT = ("values", "float32", None)  # `storage_format`: budgets in values, D3 in float32, whole soft labels
MACHINES = {  # what each machine id of the records is
    "amd-epyc-2c": "2-core x86_64 AMD EPYC (KVM, AVX-512), 24 GiB, no GPU; Python 3.11, torch 2.13.0 CPU, "
                   "`MALLOC_*` as in the Makefile",
    "intel-xeon-2c": "2-core x86_64 Intel Xeon (AVX-512 with AMX), 24 GiB, no GPU; Python 3.11, torch 2.13.0 CPU",
    "nvidia-h200": "one NVIDIA H200 (141 GiB), 16 CPU cores; Python 3.12, torch 2.11.0+cu130",
}


class Notes:
    """Numbered provenance notes, one per machine and command; a note lists the dates and commits of its records."""

    def __init__(self):
        self.numbers: dict[tuple, int] = {}
        self.versions: dict[tuple, set[tuple[str, str]]] = {}  # (date, commit) of the records per note

    def __call__(self, record: dict, command: str | None = None) -> str:
        key = (record["machine"], " ".join((command or record["command"]).split()))  # multi-line: one line
        self.versions.setdefault(key, set()).add((record["date"], record["commit"][:7]))
        return f"[{self.numbers.setdefault(key, len(self.numbers) + 1)}]"

    def markdown(self) -> list[str]:
        lines = []
        for (machine, command), number in self.numbers.items():
            dates = sorted({date for date, _ in self.versions[machine, command]})
            versions = "; ".join(f"{date}, " + ", ".join(sorted(c for d, c in self.versions[machine, command]
                                                               if d == date)) for date in dates)
            lines.append(f"{number}. {machine}, {versions}: `{command}`")
        return lines


def latest(records: list[dict], **settings) -> dict | None:
    """The latest record whose settings hold these values (records of one day: the last written)."""
    found = [r for r in records if all(r["settings"].get(k) == v for k, v in settings.items())]
    return max(enumerate(found), key=lambda pair: (pair[1]["date"], pair[0]))[1] if found else None


def storage_format(settings: dict) -> tuple[str, str, int | None]:
    """A curve record's (or row's) storage format: the unit its budget counts, how its D3 is stored, and how many
    probabilities a soft label keeps (None: all)."""
    return settings.get("unit", "values"), settings.get("storage_dtype", "float32"), settings.get("label_top_k")


def format_order(storage_format: tuple) -> tuple:
    """Sorts the paper's format (values, float32, whole labels) first."""
    return storage_format != PAPER_FORMAT, str(storage_format)


def format_text(storage_format: tuple) -> str:
    """How a table or panel names a format other than the paper's: 'in bytes, D3 in int8, top-10 labels'."""
    unit, dtype, top_k = storage_format
    return ", ".join([f"in {unit}"] + ([f"D3 in {dtype}"] if dtype != "float32" else [])
                     + ([f"top-{top_k} labels"] if top_k is not None else []))


def baselines_reaching_d3(means: dict[str, float]) -> list[str]:
    """The baselines whose mean accuracy is at or above D3's at one budget (none where D3 was not measured)."""
    return [m for m in BASELINES if "D3" in means and means.get(m, -1.0) >= means["D3"]]


def mean_std(values: list[float], scale: float = 1.0) -> str:
    values = [scale * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def accuracy_tables(results: dict, notes: Notes) -> list[str]:
    curve = [r for r in results["accuracy_vs_storage"] if "variant" not in r["settings"]]
    lines = ["## Accuracy against storage", "",
             "Test accuracy (%, mean ± std over seeds) of fresh students trained on what each method "
             "stores within a budget in IPC-equivalents: values (the paper's unit) or bytes (D3's files against "
             "uint8 images; real and prototype images uint8, soft labels stored as D3's). D3: sizes from the "
             "budget; D3-hand: a shipped config's; prototypes: real images optimised by D3's objective (-converged: "
             "until held-out accuracy stops rising, `benchmarks/converged.py`); R+H / R+S: random real images, "
             "class / teacher labels; R+S-low: R+S stored 2 or 4 times smaller per side. "
             "`benchmarks/accuracy_vs_storage.py`; `-`: not measured; `*`: over the budget; `°`: soft labels at "
             "the temperature that scored best on held-out images, from 0.25-8 or the note's `--temperatures` "
             "(without: R+S and R+S-low from 1-8, D3 and prototypes at 1).", ""]
    for dataset, title in DATASETS.items():
        for form in sorted({storage_format(r["settings"]) for r in curve if r["settings"]["dataset"] == dataset},
                           key=format_order):
            records = [r for r in curve
                       if r["settings"]["dataset"] == dataset and storage_format(r["settings"]) == form]
            rows, d3_beaten = [], []
            # a method no budget of this table measured gets no column
            methods = [m for m in METHODS if any(r["settings"]["method"] == m for r in records)]
            for budget in sorted({r["settings"]["budget_ipc"] for r in records}):
                row = [f"{budget:g}"]
                means, marked = {}, {}
                for method in methods:
                    record = latest(records, budget_ipc=budget, method=method)
                    if record is None:
                        row.append("-")
                        continue
                    means[method] = statistics.mean(record["figures"]["accuracies"])
                    command = re.sub(r"--methods( [^-\s]\S*)+", "--methods <methods>",
                                     re.sub(r"--budgets( [\d.]+)+", "--budgets <budgets>", record["command"]))
                    over = "*" if record["figures"].get("over_budget") else ""
                    chosen = "°" if "label_temperatures" in record["settings"].get("config", {}) else ""
                    marked[method] = method + over
                    row.append(f"{mean_std(record['figures']['accuracies'], 100)}{over}{chosen} "
                               f"{notes(record, command)}")
                rows.append(row)
                if beaten := baselines_reaching_d3(means):
                    d3_beaten.append(f"{budget:g} ({', '.join(marked[m] for m in beaten)})")
            where = "" if form == PAPER_FORMAT else ", " + format_text(form)
            lines += [f"### {title}{where}", "", *table([f"budget (IPC-eq, {form[0]})", *methods], rows), ""]
            if d3_beaten:
                lines += ["**A baseline at or above D3** (mean) at budget " + ", ".join(d3_beaten) + ".", ""]
            peaks = [(budget, record["figures"]["peak_rss_gib"]) for budget in sorted({r["settings"]["budget_ipc"]
                     for r in records}) if (record := latest(records, budget_ipc=budget, method="D3"))
                     and "peak_rss_gib" in record["figures"]]
            if peaks:
                lines += ["D3's peak resident memory (GiB): " + ", ".join(
                    f"{peak:.2f} at {budget:g}" for budget, peak in peaks) + ".", ""]
    return lines


def own_data_table(results: dict, notes: Notes) -> list[str]:
    """The defaults on a newcomer's data: `recipes/distill.py --dataset <data> --storage_budget_ipc <B>` alone."""
    rows = []
    for record in results.get("own_data", []):
        s, figures = record["settings"], record["figures"]
        rows.append([s["dataset"], f"{s['storage_budget_ipc']:g}", f"{figures['resolution']}x{figures['resolution']}"
                     f"x{figures['channels']}", f"{figures['wall_time_s'] / 60:.1f}", f"{figures['peak_rss_gib']:.2f}",
                     mean_std(figures["accuracies"], 100), f"{100 * figures['teacher_accuracy']:.2f}",
                     record["machine"], notes(record)])
    if not rows:
        return []
    return ["### Your own data with the defaults", "",
            "`benchmarks/own_data.py`: `accelerate launch recipes/distill.py --dataset <data> --storage_budget_ipc "
            "<budget>` alone (the machine's preset; resolution and channels from the images). Wall time (min), peak "
            "resident memory (GiB), students' and teacher's test accuracy (%).", "",
            *table(["dataset", "budget (IPC-eq)", "images", "minutes", "peak GiB", "accuracy", "teacher",
                    "machine", "note"], rows), ""]


def storage_dtype_table(results: dict, notes: Notes) -> list[str]:
    """One distilled set stored in each dtype: what quantising at the end costs in accuracy, and saves in bytes."""
    rows = []
    for record in results.get("storage_dtype", []):
        figures = record["figures"]
        reference = statistics.mean(figures["float32"]["accuracies"]) if "float32" in figures else None
        for dtype, row in figures.items():
            change = ("" if reference is None or dtype == "float32"
                      else f"{100 * (statistics.mean(row['accuracies']) - reference):+.2f}")
            rows.append([Path(record["settings"]["config"]).name, dtype, mean_std(row["accuracies"], 100), change,
                         f"{row['total_bytes']:,}", f"{row['ipc_equivalent_bytes']:.2f}", notes(record)])
    if not rows:
        return []
    return ["### One distilled set in each storage dtype", "",
            "`benchmarks/storage_dtype.py`: the same distillation, quantised at the end of the run and relabelled "
            "before; students train on what its files give back. Accuracy (%), its change against "
            "float32 (points), stored bytes and the IPC-equivalent in bytes.", "",
            *table(["config", "storage dtype", "accuracy", "vs float32", "bytes", "IPC-eq (bytes)", "note"], rows),
            ""]


def ceiling_table(results: dict, notes: Notes) -> list[str]:
    """The protocol networks trained on every training image: what a distilled set's students could reach."""
    rows = []
    for record in results.get("ceiling", []):
        s, figures = record["settings"], record["figures"]
        rows.append([Path(s["dataset"]).name, f"{s['resolution']}x{s['resolution']}", f"{s['architecture']}, depth "
                     f"{s['net_depth']}, width {s['net_width']}", str(s["epochs"]), f"{figures['test_accuracy']:.2f}",
                     f"{figures['train_wall_time_s'] / 60:.0f}", record["machine"], notes(record)])
    if not rows:
        return []
    return ["### Ceilings", "", "The protocol's network trained on every training image "
            "(`benchmarks/ceiling.py`): test accuracy (%) and training time (min, one thread).", "",
            *table(["dataset", "images", "network", "epochs", "accuracy", "minutes", "machine", "note"], rows), ""]


def gpu_tinyimagenet_table(results: dict, notes: Notes) -> list[str]:
    """The paper's network on a Tiny ImageNet subset on one GPU, shortened to one device run: each machine's latest."""
    records = results.get("gpu_tinyimagenet", [])
    rows, steps = [], []
    for machine in sorted({r["machine"] for r in records}):
        record = latest([r for r in records if r["machine"] == machine])
        figures, note = record["figures"], notes(record)
        for budget, row in figures["d3"].items():
            rs = figures["r_plus_s"][budget]
            rows.append([budget, "D3", f"{row['ipc_equivalent']:.2f}", mean_std(row["accuracies"], 100),
                         f"{row['iterations_per_second']:.2f}", f"{row['peak_memory_gib']:.1f}", machine, note])
            over = ", over budget" if rs["over_budget"] else ""
            peak = figures.get("r_plus_s_peak_memory_gib")
            rows.append([budget, f"R+S ({rs['images_per_class']} img/class, T={rs['temperature']:g}{over})",
                         f"{rs['ipc_equivalent']:.2f}", mean_std(rs["accuracies"], 100), "-",
                         "-" if peak is None else f"{peak:.1f}", machine, note])
        unroll, teacher = figures["unroll"], next(iter(figures["d3"].values()))["teacher_accuracy"]
        rates = unroll["card_matmul_tflop_per_s"]
        steps.append(f"{machine} {note}: the trajectory-matching step ({unroll['steps']} steps x "
                     f"{unroll['images_per_step']} images) ran at {unroll['tflop_per_s']:.1f} TFLOP/s, "
                     f"{100 * unroll['tflop_per_s'] / rates['tf32']:.0f} % of the card's TF32 matrix product "
                     f"({rates['tf32']:.0f} TFLOP/s; float32: {rates['float32']:.0f}); teacher "
                     f"{100 * teacher:.2f} %; whole script {figures['wall_time_s'] / 60:.1f} min.")
    if not rows:
        return []
    return ["### Tiny ImageNet on one GPU, shortened", "",
            "The paper's network (64x64 ConvNet-D4, width 128) on 100 training images per class and the whole test "
            "split, every phase cut to fit one 10-minute device run (`benchmarks/gpu_tinyimagenet.sh`, "
            "docs/gpu.md): test accuracy (%), D3's distillation iterations per second and peak GPU memory (GiB).",
            "", *table(["budget (IPC-eq)", "method", "stored IPC-eq", "accuracy", "iterations / s", "peak memory",
                        "machine", "note"], rows), "", *steps, ""]


def speed_table(results: dict, notes: Notes) -> list[str]:
    mtt, demo, gpu = results["mtt_iteration"], results["demo"], results["gpu_smoke"]
    rows = []
    for machine in ("amd-epyc-2c", "intel-xeon-2c"):
        on = [r for r in mtt if r["machine"] == machine]
        if flops := latest(on, part="flops"):
            figures = flops["figures"]["flops"]
            rows.append(["MTT iteration, one thread (s)", f"{figures['seconds_per_iteration']:.2f}", machine,
                         notes(flops)])
            rows.append(["its convolutions at one convolution's rate (s)",
                         f"{figures['convolution_floor_s']:.2f}", machine, notes(flops)])
    for machine in ("amd-epyc-2c", "intel-xeon-2c"):
        if run := latest([r for r in demo if r["machine"] == machine and "wall_time" in r["figures"]]):
            threads = run["settings"]["threads"]
            rows.append([f"`make demo` wall time, {threads} thread{'s' * (threads > 1)}", run["figures"]["wall_time"],
                         machine, notes(run)])
    for config in ("imagenet_64_ipc1", "imagenet_64_ipc2", "imagenet_64_ipc10"):
        runs = {precision: latest(gpu, config=f"recipes/configs/{config}.yaml", mixed_precision=precision,
                                  compile_inner_step=False, iterations=10, cudnn_benchmark=None)
                for precision in ("no", "bf16")}
        runs = {"float32" if p == "no" else p: run for p, run in runs.items() if run}
        if runs:
            first = next(iter(runs.values()))
            rows.append([f"{config}, {' / '.join(runs)}: iterations / s; peak GPU GiB",
                         " / ".join(f"{r['figures']['iterations_per_second']:.2f}; "
                                    f"{r['figures']['peak_memory_gib']:.1f}" for r in runs.values()),
                         first["machine"], " ".join(dict.fromkeys(notes(r) for r in runs.values()))])
    if compiled := latest(gpu, compile_inner_step=True):
        rows.append(["imagenet_64_ipc1, compiled inner step: iterations / s",
                     f"{compiled['figures']['iterations_per_second']:.2f}", compiled["machine"], notes(compiled)])
    if whole := latest(results["gpu_end_to_end"]):
        seconds = whole["figures"]["metrics"]["total_wall_time_s"]
        rows.append(["a shortened whole run on a GPU, wall time (s)", f"{seconds:.1f}", whole["machine"], notes(whole)])
    return ["## Speed", "", "MTT iteration: CIFAR-10 shape, 20 Gaussians, 10 unrolled steps, ConvNet-D3 width 128 "
            "(`benchmarks/mtt_iteration.py`). GPU: a few distillation iterations of the ImageNet-64 configs on a "
            "generated stand-in, 200 images per unrolled step (`benchmarks/gpu_smoke.py`).", "",
            *table(["what", "figure", "machine", "note"], rows), ""]


def scale_tables(results: dict, notes: Notes) -> list[str]:
    rows = []
    for record in results["federated_speedup"]:
        rows.append([record["settings"]["run"], f"{record['figures']['distill_wall_time_s']:.1f}",
                     record["machine"], notes(record)])
    lines = ["## Scale", "", "Federated distillation: the distillation phase's wall time (s), Fashion-MNIST, 300 "
             "images per class, 30 iterations (`benchmarks/federated_speedup.py`).", "",
             *table(["run", "wall time (s)", "machine", "note"], rows), "", *many_classes_table(results, notes)]
    rows = []
    for record in results["data_path"]:
        s, ranks = record["settings"], record["figures"].get("ranks", [])
        if s["path"] != "new":  # the data path before the image cache: its comparison is in the records and git
            continue
        batch = " ".join(s["overrides"]) or "-"
        peak_start = max(r["peak_rss_at_expert_start_mib"] for r in ranks) if ranks else None
        first_step = [r["time_to_first_expert_step_s"] for r in ranks if r["time_to_first_expert_step_s"]]
        rows.append([f"{s['train_images']:,}", s["image_cache"], batch,
                     f"{max(first_step):.0f}" if first_step else "not run",
                     f"{peak_start:,.0f}" if peak_start else "-", notes(record)])
    lines += ["Data path at ImageNet's shape: per rank, 2 gloo ranks, `imagenet_64_ipc10.yaml` with 4 subtasks on a "
              "generated 1,000-class stand-in; the worse of the two ranks (`benchmarks/data_path.py`).", "",
              *table(["train images", "image cache", "overrides", "s to 1st expert step",
                      "peak RSS to expert start (MiB)", "note"], rows), ""]
    return lines


def many_classes_table(results: dict, notes: Notes) -> list[str]:
    """K=1 against K subtasks at one budget, the K subtasks on 1 and 2 processes (each timed from nothing)."""
    rows = []
    for record in results.get("federated_many_classes", []):
        s, figures = record["settings"], record["figures"]
        timed = s["timed_from_nothing"]
        rows.append([DATASETS[s["dataset"]].split(" (")[0], f"{s['budget']:g}", str(s["num_subtasks"]),
                     str(s["processes"]), mean_std(figures["accuracies"], 100), str(len(figures["accuracies"])),
                     f"{figures['distill_wall_time_s'] / 60:.1f}" if timed else "curve's stages",
                     speedup(figures), f"{max(figures['peak_memory_gib_per_subtask']):.2f}", notes(record)])
    if not rows:
        return []
    return ["Federated at many classes, on the curve's protocol (`benchmarks/federated_many_classes.py`):"
            " accuracy (%), minutes of the distillation phase from an empty stage folder, speedup over 1 process "
            "(and whether the pipelines are equal), a subtask's peak resident memory (GiB).", "",
            *table(["dataset", "IPC-eq", "K", "processes", "accuracy", "students", "minutes", "speedup",
                    "peak GiB", "note"], rows), ""]


def speedup(figures: dict) -> str:
    if "speedup" not in figures:
        return "-"
    same = "same" if figures["same_pipeline_as_1_process"] else "different"
    return f"{figures['speedup']:.2f}x, {same} pipeline"


def render(results_dir: Path = RESULTS) -> str:
    results = {path.stem: load_records(path) for path in sorted(results_dir.glob("*.json"))}
    notes = Notes()
    body = [*accuracy_tables(results, notes), *storage_dtype_table(results, notes), *own_data_table(results, notes),
            *ceiling_table(results, notes),
            *gpu_tinyimagenet_table(results, notes),
            *speed_table(results, notes),
            *scale_tables(results, notes)]
    head = ["# Benchmarks", "",
            "<!-- Written by benchmarks/report.py from benchmarks/results/*.json: do not edit by hand. -->", "",
            "Each figure's record (per-seed accuracies, timings, memory, settings) is in "
            "[`benchmarks/results/`](benchmarks/results/), written by its benchmark (`benchmarks/record.py`); "
            "`python benchmarks/report.py` rewrites this page. History: `git log -p benchmarks/results`.", ""]
    machines = ["Machines:", "", *(f"- `{name}`: {text}" for name, text in MACHINES.items()), ""]
    return "\n".join([*head, *body, "## Notes", "", *notes.markdown(), "", *machines])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    args.output.write_text(render())


if __name__ == "__main__":
    main()
