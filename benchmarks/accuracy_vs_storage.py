"""The curve benchmark: test accuracy against storage, 1 to 50 IPC-equivalent, for D3 sized by the budget alone,
explicit prototypes distilled with D3's objective, and random real images with hard (R+H) or soft (R+S) labels.

    python benchmarks/accuracy_vs_storage.py --dataset fashion_mnist --budgets 1 2 5 10 20 50 \
        --output_dir outputs/curve [--seeds 3] [any D3Config override, e.g. --iterations 60]
    python benchmarks/accuracy_vs_storage.py --plot_only --output_dir outputs/curve

`--dataset` is `fashion_mnist` (`recipes/configs/fashion_mnist.yaml`: the offline data), `cifar10`
(`recipes/configs/cifar10_ipc10.yaml`) or `tiny_imagenet` (`recipes/configs/tinyimagenet_cpu.yaml`), the last two
on `--data_path` (default: their folders in ../shared/data, test split `test`); the shipped
config's data, networks and phase lengths are kept and its sizes dropped, so `storage_budget_ipc` chooses them.
Per dataset, the experts and the relabelling teacher are trained once, as stages (`hf_d3.stages`) in
`<out>/<dataset>/shared`, which every D3 run uses as its `stage_dir`, so every budget and method shares them.
Per budget, in `<out>/<dataset>/ipc<B>/`:
1. D3: `recipes/distill.py` with `--storage_budget_ipc B` in its own process; at budgets a config ships for
   (10 and 50), also D3-hand: the same with that config's hand-chosen sizes (the auto-sizing's yardstick).
2. Prototypes: the most real images per class whose pixels and soft labels fit in the budget (at least one),
   distilled from the same experts for the same iterations (`hf_d3.baselines.distill_prototypes`), relabelled
   by the same teacher.
3. R+H / R+S: the most real images per class that fit with a class id / a soft label (at least one).
4. R+S-low: R+S with its images stored 1, 2 or 4 times smaller per side (`hf_d3.baselines.stored_smaller`), so up
   to 16x as many fit, upsampled to the training side for the teacher and the students; the factor and temperature
   are chosen together on the held-out images, at the hard-label weight R+S chose (factor 1 is R+S: its scores are
   reused).
Every method with soft labels labels at the temperature (`--temperatures`, default `TEMPERATURES`) whose student
scores best on held-out training images (D3: its run's pipeline relabelled at each, then run again at the best, which
reuses its subtasks).
D3's soft labels mix the class in at the `hard_label_weight` of its budget (`hf_d3.teacher.hard_label_weight_for`
unless the command line sets one). The prototypes and R+S choose on the held-out images between that mix and the
teacher's labels alone (weight 0), jointly with the temperature; R+H's are class ids. A row saved with another
grid of temperatures lends its held-out scores, and its test accuracies where its choice stands (`earlier_row`).
A baseline that needs more than the budget (one image per class does not fit) is marked `over_budget`. Every student
uses the config's evaluation settings and `--seeds` seeds; where two methods at a budget are within 2 std of each
other, both get students with the next seeds up to `--close_seeds` (a student depends on its seed alone). Finished
rows (`row_<method>.json`) are reused when their settings (but where to write and how to log) and torch's thread
count match, so two processes with other `--budgets` can share a folder; a baseline's row missing there is restored
from its committed record (`restore_rows`), so a fresh clone goes on where the records stop; a D3 row whose labels
or students changed reuses its distilled subtasks (their stage keys do not change). Every run merges what is there into
`<out>/results.json` and draws `--figure` (default `<out>/accuracy_vs_storage.png`) from the records in
benchmarks/results, as BENCHMARKS.md shows them (`--plot_only --figure src/hf_d3/model_cards/accuracy_vs_storage.png`
redraws the one the cards ship).
"""

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from record import load_records, save_record  # this folder is on sys.path when the script runs
from report import PAPER_FORMAT, baselines_reaching_d3, format_order, format_text, storage_format
from transformers import AutoModelForImageClassification

from hf_d3 import D3Pipeline  # (the import also registers the classifiers with the Auto classes)
from hf_d3.atomic import write_json
from hf_d3.baselines import (
    choose_temperature,
    distill_prototypes,
    pick_per_class,
    random_real_sampler,
    split_held_out,
)
from hf_d3.config import PAPER_SIZES, D3Config, DistillationConfig, RepresentationConfig
from hf_d3.config_parser import parse_config
from hf_d3.data import (
    RealImages,
    class_names_of,
    load_images,
    load_split,
    load_subtask_images,
    load_test_images,
)
from hf_d3.evaluation import evaluate_with_config, pipeline_sampler
from hf_d3.experts import load_trajectory
from hf_d3.federated import train_expert_trajectories
from hf_d3.run_plan import RunPlan, make_plan
from hf_d3.stages import subtask_seed
from hf_d3.storage import prototype_storage, real_image_bytes
from hf_d3.teacher import hard_label_weight_for, load_teacher, relabel, teacher_labels

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"fashion_mnist": ROOT / "recipes/configs/fashion_mnist.yaml",
           "cifar10": ROOT / "recipes/configs/cifar10_ipc10.yaml",
           "tiny_imagenet": ROOT / "recipes/configs/tinyimagenet_cpu.yaml"}
# the local copies of the benchmark-only datasets: (path, test split)
LOCAL_DATA = {"cifar10": (ROOT.parent / "shared/data/cifar10-subset", "test"),
              "tiny_imagenet": (ROOT.parent / "shared/data/tiny-imagenet-200", "test")}
METHODS = ("D3", "D3-hand", "prototypes", "R+H", "R+S", "R+S-low")
# the rows the table and figure show: these and the prototypes distilled to convergence (benchmarks/converged.py)
SHOWN = (*METHODS, "prototypes-converged")
# D3-hand: D3 with the sizes of the shipped config for that budget (its phases are the curve's, like every method's)
HAND_SIZED = {("fashion_mnist", 10): "fashion_mnist.yaml", ("fashion_mnist", 50): "fashion_mnist_ipc50.yaml",
              ("cifar10", 10): "cifar10_ipc10.yaml", ("cifar10", 50): "cifar10_ipc50.yaml"}
TITLES = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 subset (5,085 train / 1,017 test)",
          "tiny_imagenet": "Tiny ImageNet at 32x32 (CPU protocol)"}
# the labels' temperatures every method with soft labels chooses from on held-out images (R+S, R+S-low, the
# prototypes and D3): on Tiny ImageNet the held-out scores of the first grid (1, 2, 4, 8) still rose at its smallest
TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
RECORDS = ROOT / "benchmarks/results/accuracy_vs_storage.json"
# the temperature rows were labelled at before they chose one (`relabel_temperature`'s default)
FIRST_TEMPERATURE = 1.0
# R+S-low stores its images this many times smaller per side (1: R+S itself, whose held-out scores it reuses)
DOWNSAMPLE_FACTORS = (1, 2, 4)


def base_config(dataset: str, data_path: Path | None, out: Path) -> Path:
    """The shipped config without its sizes or budget, written to `out`; a benchmark-only dataset read from
    `data_path` (default: its `LOCAL_DATA` folder)."""
    values = yaml.safe_load(CONFIGS[dataset].read_text())
    values = {k: v for k, v in values.items() if k not in PAPER_SIZES and k != "storage_budget_ipc"}
    if dataset in LOCAL_DATA:
        default_path, test_split = LOCAL_DATA[dataset]
        values["dataset"], values["test_split"] = str((data_path or default_path).resolve()), test_split
    path = out / "base.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


def prepare_shared(config, train) -> RunPlan:
    """Experts and teacher of the dataset, trained once as the stages of `config` (its `output_dir`), which every
    D3 run of the curve shares as its `stage_dir` (the first process to get here trains, the others wait)."""
    # experts and teacher depend on no size, but a plan needs sizes that fit the resolution: the budget's
    budgeted = dataclasses.replace(config, representation=RepresentationConfig(storage_budget_ipc=10.0))
    plan = make_plan(budgeted, class_names_of(config.data), "no")
    plan.stage_dir.mkdir(parents=True, exist_ok=True)
    with open(plan.stage_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        train_expert_trajectories(config, plan, train, torch.device("cpu"))
        load_teacher(config, plan, train, torch.device("cpu"))
    return plan


def hand_sized_config(dataset: str, budget: float, config_path: Path, folder: Path) -> Path:
    """The curve's config with the sizes of the config shipped for this budget (`HAND_SIZED`), written to `folder`."""
    sizes = yaml.safe_load((ROOT / "recipes/configs" / HAND_SIZED[dataset, budget]).read_text())
    values = {**yaml.safe_load(config_path.read_text()), "storage_budget_ipc": budget,
              **{k: v for k, v in sizes.items() if k in PAPER_SIZES}}
    path = folder / "hand_sized.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@dataclasses.dataclass(frozen=True)
class Budget:
    """A budget of `ipc` IPC-equivalents in `unit`: stored values against an image's values, or stored bytes against
    a uint8 image's bytes, where the baselines' images are uint8 and their soft labels are stored as D3 stores its
    own in `storage_dtype` (`hf_d3.storage.real_image_bytes`); in either unit, with `label_top_k`, a soft label
    keeps and stores its k largest probabilities, as D3's do."""

    ipc: float
    unit: str
    storage_dtype: str
    num_classes: int
    values_per_image: int
    label_top_k: int | None = None

    def cost(self, images_per_class: int, soft: bool, downsample: int = 1) -> dict:
        """The storage of `images_per_class` real (or prototype) images per class, stored `downsample` times smaller
        per side, with a soft label (`soft`) or a class id each: in values, in bytes and as IPC-equivalents."""
        n, per_image = self.num_classes, self.values_per_image // downsample**2
        values = prototype_storage(n, images_per_class, per_image, soft_labels=soft, label_top_k=self.label_top_k)
        size = real_image_bytes(n, images_per_class, per_image, self.storage_dtype if soft else None,
                                self.label_top_k)
        image_values = n * self.values_per_image
        return {"values": values, "bytes": size, "ipc_equivalent": values / image_values,
                "ipc_equivalent_bytes": size / image_values}

    def images_within(self, soft: bool, downsample: int = 1) -> tuple[int, bool]:
        """The most images per class that fit (at least one) and whether even one is over the budget."""
        total = int(self.ipc * self.num_classes * self.values_per_image)
        ipc = total // self.cost(1, soft, downsample)[self.unit]
        return max(ipc, 1), ipc == 0

    @property
    def folder_name(self) -> str:
        """`ipc<B>` in values with float32 D3 and whole labels (the curve's first format), else e.g.
        `bytes<B>-int8` or `ipc<B>-top10`."""
        name = f"{'ipc' if self.unit == 'values' else 'bytes'}{self.ipc:g}"
        name = name if self.storage_dtype == "float32" else f"{name}-{self.storage_dtype}"
        return name if self.label_top_k is None else f"{name}-top{self.label_top_k}"


def d3_row(config_path: Path, args: list[str], shared: Path, run: Path, seeds: int) -> dict:
    """D3's row from `recipes/distill.py` in `run`, its stages in `shared`: the experts and teacher
    `prepare_shared` trained, and every subtask and evaluation of earlier settings, reused where their keys match
    (`hf_d3.stages`), so a rerun of other labels or students redistils nothing."""
    command = [sys.executable, str(ROOT / "recipes/distill.py"), "--config", str(config_path), *args,
               "--output_dir", str(run), "--stage_dir", str(shared), "--eval_seeds", str(seeds)]
    subprocess.run(command, check=True)
    # the largest resident set of this process's children so far: D3's run, the first child a curve run starts
    peak_rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    metrics = json.loads((run / "metrics.json").read_text())
    chosen = json.loads((run / "config.json").read_text())
    storage = metrics["storage"]
    return {"values": storage["total_values"], "bytes": storage["total_bytes"],
            "ipc_equivalent": storage["ipc_equivalent"], "ipc_equivalent_bytes": storage["ipc_equivalent_bytes"],
            "accuracies": metrics["accuracies"], "over_budget": False,
            "sizes": {k: chosen[k] for k in PAPER_SIZES},
            "iterations": [s["iterations_run"] for s in metrics["subtasks"]],
            "distill_wall_time_s": sum(s["distill_wall_time_s"] for s in metrics["subtasks"]),
            "peak_rss_gib": round(peak_rss_gib, 2)}


class KeptScores:
    """Held-out scores (`held_out_scorer`) kept in `<folder>/held_out_scores.json` the moment each is measured, so a
    run killed while a method chooses keeps them: by method, its row's settings (but bookkeeping) and the choice."""

    def __init__(self, folder: Path, make_score, settings_of):
        self.path, self.make_score, self.settings_of = folder / "held_out_scores.json", make_score, settings_of
        self.score = None  # made the first time a score is measured: it holds the held-out images

    def __call__(self, method: str, choice: str, make_sampler) -> float:
        settings = {k: v for k, v in self.settings_of(method).items() if k not in BOOKKEEPING}
        key = f"{method} {hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]} {choice}"
        kept = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if key in kept:
            return kept[key]
        self.score = self.score or self.make_score()
        measured = self.score(make_sampler())
        # two curve processes of other --methods may share the folder: read and write under a lock
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            kept = json.loads(self.path.read_text()) if self.path.is_file() else {}
            write_json(self.path, {**kept, key: measured})
        return measured


def temperature_scores(held_out: KeptScores, method: str, choice: str, make_sampler,
                       known: dict[str, float] | None) -> dict[str, float]:
    """`method`'s held-out scores at each temperature of its row's grid (`row_settings`) for `choice` (its other
    choices, e.g. "weight 0.0"), `make_sampler(temperature)` giving the set labelled at it; `known`: scores an
    earlier row measured."""
    return choose_temperature(lambda t: held_out(method, f"{choice} temperature {t}".lstrip(), lambda: make_sampler(t)),
                              held_out.settings_of(method)["label_temperatures"], known)[1]


def chosen_d3_row(method: str, config_path: Path, args: list[str], shared: Path, run: Path, seeds: int, teacher,
                  held_out: KeptScores, earlier: dict | None) -> dict:
    """D3's row at the labels' temperature whose held-out score is best (`d3_held_out_scores`), from its run in
    `run` at that temperature (which reuses the subtasks of any other, and the students of an earlier run at it).
    The pipeline scored is an `earlier` row's run (`earlier_row`) where `run` still holds it, else a run with one
    student; an earlier row's accuracies stand where its temperature wins."""
    made = None  # the temperature `row`'s accuracies were measured at
    config = run / "config.json"
    if earlier is not None and config.is_file() and (json.loads(config.read_text())["relabel_temperature"]
                                                     == earlier.get("temperature", FIRST_TEMPERATURE)):
        row, made = earlier, earlier.get("temperature", FIRST_TEMPERATURE)
    else:
        d3_row(config_path, args, shared, run, seeds=1)
    scores = d3_held_out_scores(method, run, teacher, held_out, (earlier or {}).get("held_out_accuracy") or {})
    best = float(max(scores, key=scores.get))
    if best != made:
        row = d3_row(config_path, [*args, "--relabel_temperature", str(best)], shared, run, seeds)
    return {**row, "temperature": best, "held_out_accuracy": scores}


def prototype_set(config, shared: RunPlan, train, test: RealImages, budget: Budget) -> tuple[torch.Tensor, dict]:
    """The prototypes (class by class) and their row without labels or accuracies (deterministic at a fixed thread
    count, so a top-up redistills the same images); in bytes, their pixels rounded to uint8 levels, as they would be
    published."""
    n = len(test.class_names)
    ipc, over = budget.images_within(soft=True)
    classes = list(range(n))
    assert config.run.num_subtasks == 1, "prototypes are distilled as one subtask"
    seed = subtask_seed(config.run.seed, 0)
    data = load_subtask_images(train, config.data, classes, seed)
    trajectories = [load_trajectory(expert.folder(shared.stage_dir)) for expert in shared.experts[0]]
    start = data.images[pick_per_class(data.labels, n, ipc, seed)]
    prototypes, stats = distill_prototypes(start, data, trajectories, config.distillation,
                                           torch.Generator().manual_seed(seed))
    if budget.unit == "bytes":
        prototypes = (prototypes * 255).round() / 255
    return prototypes, {**budget.cost(ipc, soft=True), "over_budget": over, "images_per_class": ipc, **stats}


def prototype_sampler(config, prototypes: torch.Tensor, teacher, num_classes: int, hard_label_weight: float,
                      temperature: float):
    """The prototypes with the teacher's labels at `temperature` and `hard_label_weight`."""
    classes = torch.arange(num_classes).repeat_interleave(len(prototypes) // num_classes)
    soft = teacher_labels(teacher, prototypes, temperature, classes, hard_label_weight,
                          config.representation.label_top_k)
    return lambda _g: (prototypes, soft)


def baseline_label_weights(hard_label_weight: float) -> list[float]:
    """The hard-label weights a baseline's soft labels choose from on held-out images: pure teacher labels, or the
    mix D3 gets at the budget (the mix helps D3's decoded samples but can hurt real images:
    benchmarks/results/accuracy_vs_storage.json)."""
    return sorted({0.0, hard_label_weight})


def real_sampler(config, pool: RealImages, teacher, ipc: int, temperature: float | None,
                 hard_label_weight: float = 0.0, downsample: int = 1):
    """R+H (`temperature` None), R+S or R+S-low (`downsample` > 1): the same random real images every time, from
    the non-held-out pool."""
    return random_real_sampler(pool.images, pool.labels, len(pool.class_names), ipc, config.run.seed,
                               None if temperature is None else teacher, temperature or 1.0, hard_label_weight,
                               downsample, config.representation.label_top_k)


def held_out_and_pool(train_tensors: RealImages, seed: int) -> tuple[torch.Tensor, RealImages]:
    """The held-out indices that choose R+S's temperature, and the pool the real images are drawn from."""
    held_out, pool = split_held_out(len(train_tensors.labels), seed)
    return held_out, train_tensors.subset(pool)


def held_out_scorer(config, train_tensors: RealImages, num_classes: int):
    """A sampler's score: the accuracy on the held-out training images of one student trained on it."""
    held_out, _ = split_held_out(len(train_tensors.labels), config.run.seed)  # indices only: no copy of the pool
    images, labels = train_tensors.images[held_out], train_tensors.labels[held_out]
    return lambda sampler: evaluate_with_config(config.evaluation, config.experts, sampler, images, labels,
                                                num_classes, seeds=1).accuracy_mean


def downsample_factors(side: int) -> list[int]:
    return [f for f in DOWNSAMPLE_FACTORS if side % f == 0]


def real_rows(config, train_tensors: RealImages, test: RealImages, teacher, budget: Budget, seeds: int,
              methods: list[str], held_out: KeptScores, r_plus_s: dict | None = None,
              earlier: dict | None = None) -> dict:
    """The rows of R+H, R+S and R+S-low (in that order, R+S-low after R+S: it reuses its choices, from this call or
    `r_plus_s`, R+S's saved row). `earlier` holds rows of these methods saved before the grid of temperatures
    grew (`earlier_row`): their held-out scores are reused, and their test accuracies where the choice stands."""
    earlier = earlier or {}
    n = len(test.class_names)
    _, pool = held_out_and_pool(train_tensors, config.run.seed)
    rows = {}
    for method in sorted(methods, key=METHODS.index):
        soft, downsample = method != "R+H", 1
        ipc, over = budget.images_within(soft)
        temperature, weight, held_out_scores = None, None, None
        prior = earlier.get(method) or {}  # None where a method has no earlier row
        known = prior.get("held_out_accuracy") or {}
        if method == "R+S":  # the temperature and hard-label weight whose student scores best on held-out images
            held_out_scores = {str(w): temperature_scores(
                held_out, method, f"weight {w}", lambda t, w=w, ipc=ipc: real_sampler(config, pool, teacher, ipc, t, w),
                known.get(str(w))) for w in baseline_label_weights(config.relabel.hard_label_weight)}
            best = max(((w, t) for w, scores in held_out_scores.items() for t in scores),
                       key=lambda k: held_out_scores[k[0]][k[1]])
            weight, temperature = float(best[0]), float(best[1])
        if method == "R+S-low":  # the factor and temperature, at R+S's hard-label weight
            r_plus_s = rows.get("R+S", r_plus_s)
            weight = r_plus_s["hard_label_weight"]
            if prior.get("hard_label_weight") != weight:
                known = {}  # scored at another weight
            known["1"] = r_plus_s["held_out_accuracy"][str(weight)]
            held_out_scores = {str(f): temperature_scores(
                held_out, method, f"weight {weight} factor {f}", lambda t, f=f, w=weight: real_sampler(
                    config, pool, teacher, budget.images_within(soft=True, downsample=f)[0], t, w, f),
                known.get(str(f))) for f in downsample_factors(test.images.shape[-1])}
            best = max(((f, t) for f, scores in held_out_scores.items() for t in scores),
                       key=lambda k: held_out_scores[k[0]][k[1]])
            downsample, temperature = int(best[0]), float(best[1])
            ipc, over = budget.images_within(soft=True, downsample=downsample)
        choice = {"images_per_class": ipc, "temperature": temperature, "hard_label_weight": weight,
                  "downsample": downsample}
        accuracies = carried_accuracies(earlier.get(method), choice) or evaluate_with_config(
            config.evaluation, config.experts, real_sampler(config, pool, teacher, ipc, temperature, weight or 0.0,
                                                            downsample),
            test.images, test.labels, n, seeds=seeds).accuracies
        rows[method] = {**budget.cost(ipc, soft, downsample), "over_budget": over, "accuracies": accuracies,
                        **choice, "held_out_accuracy": held_out_scores}
    return rows


def carried_accuracies(earlier: dict | None, choice: dict) -> list[float] | None:
    """The test accuracies of an `earlier` row of the same method (`earlier_row`) whose choices on held-out images
    were these (its students trained on what this row's would: a student depends on its seed alone), else None."""
    if earlier is None:
        return None
    made = {"temperature": FIRST_TEMPERATURE, "downsample": 1, **earlier}
    return earlier["accuracies"] if all(made.get(k) == v for k, v in choice.items()) else None


def prototype_row(config, shared: RunPlan, train, test: RealImages, teacher, budget: Budget, seeds: int,
                  held_out: KeptScores, earlier: dict | None = None) -> dict:
    """The prototypes' row, labelled at the hard-label weight and temperature whose student scores best on held-out
    images (the prototypes are distilled from all training images, held-out ones included: the choice is between
    labels of the same images). An `earlier` row (`earlier_row`) lends its scores, and its accuracies where the
    choice stands."""
    n = len(test.class_names)
    prototypes, row = prototype_set(config, shared, train, test, budget)
    known = (earlier or {}).get("held_out_accuracy") or {}
    known = {w: s if isinstance(s, dict) else {str(FIRST_TEMPERATURE): s} for w, s in known.items()}  # one per weight
    held_out_scores = {str(w): temperature_scores(
        held_out, "prototypes", f"weight {w}", lambda t, w=w: prototype_sampler(config, prototypes, teacher, n, w, t),
        known.get(str(w))) for w in baseline_label_weights(config.relabel.hard_label_weight)}
    best = max(((w, t) for w, scores in held_out_scores.items() for t in scores),
               key=lambda k: held_out_scores[k[0]][k[1]])
    choice = {"hard_label_weight": float(best[0]), "temperature": float(best[1])}
    accuracies = carried_accuracies(earlier, choice) or evaluate_with_config(
        config.evaluation, config.experts, prototype_sampler(config, prototypes, teacher, n, **choice),
        test.images, test.labels, n, seeds=seeds).accuracies
    return {**row, "accuracies": accuracies, **choice, "held_out_accuracy": held_out_scores}


def d3_held_out_scores(method: str, run: Path, teacher, held_out: KeptScores,
                       known: dict[str, float]) -> dict[str, float]:
    """The held-out scores of D3's pipeline in `run` relabelled at each temperature of its row's grid (`known`: scored
    already), as its run relabels (`hf_d3.teacher.relabel`, at the run's hard-label weight, then stored in its
    storage dtype; from the saved decoder, which in 8 or 16 bits is the run's within the quantisation error)."""
    chosen = json.loads((run / "config.json").read_text())

    def relabelled(temperature: float):
        pipe = D3Pipeline.from_pretrained(run / "pipeline")
        relabel(pipe.latent_store, pipe.decoder, teacher, temperature, chosen["hard_label_weight"])
        pipe.set_storage_dtype(chosen["storage_dtype"])
        return pipeline_sampler(pipe)

    return temperature_scores(held_out, method, "", relabelled, known)


def close_methods(rows: dict[str, dict]) -> set[str]:
    """The methods whose mean accuracy is within 2 std (the larger of the pair's) of another method's."""
    stats = {m: (acc.mean().item(), acc.std().item()) for m, row in rows.items()
             if len(acc := torch.tensor(row["accuracies"])) > 1}
    return {a for a in stats for b in stats
            if a != b and abs(stats[a][0] - stats[b][0]) <= 2 * max(stats[a][1], stats[b][1])}


def top_up_sampler(method: str, row: dict, config, folder: Path, shared: RunPlan, train, test: RealImages, teacher,
                   budget: Budget, train_tensors: RealImages | None):
    """The epoch sampler that gave `row`'s accuracies, rebuilt, and the run config its students use."""
    if method in ("D3", "D3-hand"):
        run = folder / ("d3" if method == "D3" else "d3_hand")
        return pipeline_sampler(D3Pipeline.from_pretrained(run / "pipeline")), parse_config(
            ["--config", str(run / "config.json")])
    if method == "prototypes":
        prototypes, _ = prototype_set(config, shared, train, test, budget)
        return prototype_sampler(config, prototypes, teacher, len(test.class_names), row["hard_label_weight"],
                                 row.get("temperature", FIRST_TEMPERATURE)), config
    _, pool = held_out_and_pool(train_tensors, config.run.seed)
    return real_sampler(config, pool, teacher, row["images_per_class"], row["temperature"],
                        row["hard_label_weight"] or 0.0, row.get("downsample", 1)), config


# settings whose default changed what is computed when they were added: the value rows saved before them used
BEFORE_IT_EXISTED = {"hard_label_weight": 0.0}
# settings only distilled sets depend on (their sizes, warm start and objective): a new distillation setting keeps
# the random-real rows
DISTILLATION_ONLY = ({f.name for f in dataclasses.fields(DistillationConfig)}
                     | {f.name for f in dataclasses.fields(RepresentationConfig)}) - {"budget_unit", "storage_dtype",
                                                                                          "label_top_k"}
# settings that say where and how a run reports, not what it computes (and where the data is read from: a row's
# key names its dataset)
BOOKKEEPING = {"output_dir", "stage_dir", "log_every", "report_to", "collective_timeout_s", "checkpoint_every",
               "push_to_hub", "hub_model_id", "hub_dataset_id", "hub_private", "dataset"}


def setting_defaults() -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for group in D3Config.groups().values() for f in dataclasses.fields(group)}


def same_settings(saved: dict, current: dict) -> bool:
    """Whether a saved row answers for `current`: equal but for bookkeeping, where a setting added since the row was
    saved counts as equal at its default (a new setting's default keeps the old behaviour) or, where the default
    does not, at the value rows were computed with before it existed (`BEFORE_IT_EXISTED`)."""
    defaults = {**setting_defaults(), **BEFORE_IT_EXISTED}
    return all(saved.get(key, defaults.get(key)) == value for key, value in current.items() if key not in BOOKKEEPING)


def row_settings(method: str, settings: dict, temperatures=TEMPERATURES) -> dict:
    """The settings a method's row depends on: random real images are drawn without the distillation's settings
    (`DISTILLATION_ONLY`); R+H's labels are class ids, whatever the teacher's labels are; every other method chooses
    its labels' temperature from `temperatures` on held-out images, R+S and the prototypes their hard-label weight
    too."""
    if method in ("R+H", "R+S", "R+S-low"):
        settings = {k: v for k, v in settings.items() if k not in DISTILLATION_ONLY}
    if method == "R+H":
        return {k: v for k, v in settings.items() if k != "hard_label_weight"}
    settings = {**settings, "label_temperatures": sorted(float(t) for t in temperatures)}
    if method in ("R+S", "R+S-low", "prototypes"):
        return {**settings, "baseline_label_weights": baseline_label_weights(settings["hard_label_weight"])}
    return settings


def saved_row(folder: Path, method: str) -> dict | None:
    path = folder / f"row_{method}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def earlier_row(folder: Path, method: str, settings: dict) -> dict | None:
    """The saved row of `method` whose settings are these but its grid of temperatures (an earlier or other grid,
    or before the method chose one): its held-out scores carry over, and its test accuracies where its choice
    stands (`carried_accuracies`)."""
    saved = saved_row(folder, method)
    rest = {k: v for k, v in settings.items() if k != "label_temperatures"}
    return saved["row"] if saved is not None and same_settings(saved["settings"], rest) else None


def is_done(folder: Path, method: str, settings: dict) -> bool:
    saved = saved_row(folder, method)
    return saved is not None and same_settings(saved["settings"], settings)


def save_row(folder: Path, method: str, key: dict, row: dict) -> None:
    write_row(folder, method, key, row)
    save_record("accuracy_vs_storage", record_settings(method, key), row)


def write_row(folder: Path, method: str, key: dict, row: dict) -> None:
    (folder / f"row_{method}.json").write_text(json.dumps({**key, "method": method, "row": row}, indent=2))


def record_settings(method: str, key: dict) -> dict:
    """The settings of a row's record: its key, the dataset named as `portable` names it, the paper's format unsaid."""
    config = {**key["settings"], "dataset": portable(key["settings"]["dataset"])}
    units = {k: key[k] for k, default in zip(("unit", "storage_dtype", "label_top_k"), PAPER_FORMAT, strict=True)
             if key[k] != default}
    return {"dataset": key["dataset"], "budget_ipc": float(key["budget"]), "method": method, **units, "config": config}


def restore_rows(folder: Path, key: dict, settings_of, results: Path = RECORDS) -> list[str]:
    """Write the row file of each baseline that `folder` lacks but whose record is committed, with the record's
    settings, so a fresh clone continues the curve where its records stop (`outputs/` travels nowhere): a record of
    these settings (`same_settings`) makes the row done, one of an earlier grid of temperatures lends its scores
    (`earlier_row`). D3's rows are not restored: a top-up of their students needs their run's pipeline.
    `settings_of(method)`: its row's settings now. Returns the methods restored."""
    records = load_records(results)
    restored = []
    for method in ("prototypes", "R+H", "R+S", "R+S-low"):
        if saved_row(folder, method) is not None:
            continue
        current = settings_of(method)
        wanted = {**record_settings(method, {**key, "settings": current}), "config": None}
        grids = [r for r in records if {**r["settings"], "config": None} == wanted and same_settings(
            r["settings"]["config"], {k: v for k, v in current.items() if k != "label_temperatures"})]
        same = [r for r in grids if same_settings(r["settings"]["config"], current)]
        if grids:
            found = (same or grids)[-1]
            write_row(folder, method, {**key, "settings": found["settings"]["config"]}, found["figures"])
            restored.append(method)
    return restored


def portable(dataset: str) -> str:
    """A local dataset folder relative to the repository (a record names no path of the machine it ran on)."""
    path = Path(dataset)
    return os.path.relpath(path, ROOT) if path.is_absolute() else dataset


def panel_of(saved: dict) -> tuple:
    """A figure panel: the dataset and its storage format (`report.storage_format`)."""
    return saved["dataset"], *storage_format(saved)


def merge_and_plot(out: Path, figure: Path) -> dict:
    panels = {}
    for row in sorted(out.glob("*/*/row_*.json")):
        saved = json.loads(row.read_text())
        panels.setdefault(panel_of(saved), {}).setdefault(saved["budget"], {})[saved["method"]] = saved["row"]
    results = {" ".join(map(str, panel)): budgets for panel, budgets in sorted(panels.items(), key=str)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(panels_from_records(), figure)
    for (dataset, *form), budgets in sorted(panels.items(), key=str):
        unit = form[0]
        ipc_key = "ipc_equivalent" if unit == "values" else "ipc_equivalent_bytes"
        print(f"\n{dataset}, {format_text(form)}: test accuracy (%), mean +- std over seeds, at the stored "
              f"IPC-equivalent in {unit}")
        print("| budget | " + " | ".join(SHOWN) + " |\n|---|" + "---|" * len(SHOWN))
        for budget in sorted(budgets, key=float):
            cells = []
            for method in SHOWN:
                row = budgets[budget].get(method)
                if row is None:
                    cells.append("-")
                    continue
                acc = 100 * torch.tensor(row["accuracies"])
                std = acc.std().item() if len(acc) > 1 else 0.0
                over = " (over)" if row["over_budget"] else ""
                cells.append(f"{acc.mean():.2f} +- {std:.2f} @ {row[ipc_key]:.2f}{over}")
            print(f"| {budget} | " + " | ".join(cells) + " |")
    return results


def panels_from_records(path: Path = RECORDS) -> dict:
    """The figure's panels from the curve's records, the latest of each dataset, storage format, budget and method (as
    BENCHMARKS.md shows them: the last written of the latest date), whichever run or output folder wrote them."""
    chosen = {}
    for index, record in enumerate(load_records(path)):
        s = record["settings"]
        if "variant" in s:
            continue
        key = (s["dataset"], *storage_format(s), f"{s['budget_ipc']:g}", s["method"])
        if key not in chosen or (record["date"], index) >= chosen[key][0]:
            chosen[key] = ((record["date"], index), record["figures"])
    panels = {}
    for (*panel, budget, method), (_, figures) in chosen.items():
        panels.setdefault(tuple(panel), {}).setdefault(budget, {})[method] = figures
    return panels


def plot(panels: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one row per storage format (the paper's first), one column per dataset
    datasets = [d for d in TITLES if any(panel[0] == d for panel in panels)]
    forms = sorted({panel[1:] for panel in panels}, key=format_order)
    fig, axes = plt.subplots(len(forms), len(datasets), figsize=(6 * len(datasets), 4.5 * len(forms)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for (dataset, *form), budgets in panels.items():
        ax = axes[forms.index(tuple(form)), datasets.index(dataset)]
        ax.set_visible(True)
        unit = form[0]
        ipc_key = "ipc_equivalent" if unit == "values" else "ipc_equivalent_bytes"
        for method in SHOWN:
            points = sorted(((row[ipc_key], 100 * torch.tensor(row["accuracies"]))
                             for b in budgets.values() if (row := b.get(method))), key=lambda point: point[0])
            if points:
                ax.errorbar([x for x, _ in points], [a.mean().item() for _, a in points],
                            yerr=[a.std().item() if len(a) > 1 else 0.0 for _, a in points],
                            marker="o", capsize=3, label=method, color=f"C{SHOWN.index(method)}",
                            linestyle="none" if method == "D3-hand" else "-")  # a yardstick at two budgets
        ax.set_xscale("log")
        ticks = sorted({float(b) for b in budgets})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"stored {unit}, in IPC-equivalents (log)" + ("" if unit == "values" else ": uint8 images"))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(TITLES[dataset] + ("" if tuple(form) == PAPER_FORMAT else "\n" + format_text(form)))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    path.with_suffix(".md").write_text(caption(panels) + "\n")


def caption(panels: dict) -> str:
    """What the figure says about D3 against the baselines: the budgets where a baseline's mean reaches D3's, per
    panel (report.py says the same under each table of BENCHMARKS.md). The cards show it under the figure."""
    reached = []
    for (dataset, *form), budgets in sorted(panels.items(), key=lambda item: (list(TITLES).index(item[0][0]),
                                                                              format_order(item[0][1:]))):
        means = {b: {m: statistics.mean(row["accuracies"]) for m, row in rows.items()} for b, rows in budgets.items()}
        where = [f"{b} ({', '.join(m + '*' * bool(budgets[b][m].get('over_budget')) for m in found)})"
                 for b in sorted(means, key=float) if (found := baselines_reaching_d3(means[b]))]
        if where:
            reached.append(f"{TITLES[dataset]} {format_text(form)}: at {', '.join(where)}")
    if not reached:
        return "D3's mean is above every baseline's at every budget measured."
    over = " (*: over the budget, as one image a class with its label does not fit)" if "*" in str(reached) else ""
    return ("Where D3 is not worth it: a baseline's mean test accuracy is at or above D3's at these budgets "
            "(IPC-equivalents): " + "; ".join(reached) + over + ".")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="fashion_mnist")
    parser.add_argument("--data_path", type=Path, default=None, help="where a benchmark-only dataset (cifar10, "
                        "tiny_imagenet) is; default: its folder in ../shared/data")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 5, 10, 20, 50])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--close_seeds", type=int, default=5,
                        help="seeds for every method within 2 std of another method at the same budget")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES),
                        help="the grid every method with soft labels chooses its labels' temperature from on held-out "
                        "images (a row of another grid lends the scores they share)")
    parser.add_argument("--plot_only", action="store_true")
    parser.add_argument("--figure", type=Path, default=None, help="where to draw the PNG (default: in output_dir; "
                        "src/hf_d3/model_cards/accuracy_vs_storage.png ships it with the pipeline cards)")
    args, overrides = parser.parse_known_args()
    if bad := [t for t in args.temperatures if not t > 0]:
        parser.error(f"--temperatures {' '.join(f'{t:g}' for t in bad)}: a temperature must be above 0")
    figure = args.figure or args.output_dir / "accuracy_vs_storage.png"
    if args.plot_only:
        merge_and_plot(args.output_dir, figure)
        return

    out = args.output_dir / args.dataset
    config_path = base_config(args.dataset, args.data_path, out)
    base = parse_config(["--config", str(config_path), *overrides, "--output_dir", str(out / "shared")])
    base_settings = {**base.to_dict(), "seeds": args.seeds, "num_threads": torch.get_num_threads()}
    config, data = base, base.data
    train = load_split(data, data.train_split)
    shared = prepare_shared(config, train)
    teacher = AutoModelForImageClassification.from_pretrained(shared.teacher.folder(shared.stage_dir))
    columns = {"image_column": data.image_column, "label_column": data.label_column}
    test = load_test_images(data)
    train_tensors = None

    def train_images() -> RealImages:  # every training image, loaded the first time a method needs them
        nonlocal train_tensors
        train_tensors = train_tensors or load_images(train, data.resolution, data.channels, **columns)
        return train_tensors

    def evaluate(run_config, sampler, seeds: int, first_seed: int = 0):
        return evaluate_with_config(run_config.evaluation, run_config.experts, sampler, test.images, test.labels,
                                    len(test.class_names), seeds=seeds, first_seed=first_seed)
    representation = base.representation
    for ipc in args.budgets:
        budget = Budget(ipc, representation.budget_unit, representation.storage_dtype, len(test.class_names),
                        test.images[0].numel(), representation.label_top_k)
        folder = out / budget.folder_name
        folder.mkdir(parents=True, exist_ok=True)
        # every method's labels mix the class in at the weight D3 gets at this budget
        weight = base.relabel.hard_label_weight
        weight = hard_label_weight_for(ipc) if weight is None else weight  # `base` sets no budget: this one does
        config = dataclasses.replace(base, relabel=dataclasses.replace(base.relabel, hard_label_weight=weight))
        settings = {**base_settings, "hard_label_weight": config.relabel.hard_label_weight}

        def settings_of(method: str, settings=settings) -> dict:  # a row's settings at this budget
            return row_settings(method, settings, args.temperatures)
        key = {"dataset": args.dataset, "budget": f"{ipc:g}", "unit": budget.unit,
               "storage_dtype": budget.storage_dtype, "label_top_k": budget.label_top_k, "settings": settings}
        if restored := restore_rows(folder, key, settings_of):
            print(f"{folder}: rows of {', '.join(restored)} restored from {RECORDS.relative_to(ROOT)}")
        d3_runs = {}  # method: its config, arguments and run folder
        if "D3" in args.methods:
            # the weight explicitly: D3's run would choose it from its values' IPC-equivalent, not from a budget
            # in bytes
            d3_runs["D3"] = (config_path, [*overrides, "--storage_budget_ipc", str(ipc), "--hard_label_weight",
                                           str(weight)], folder / "d3")
        if "D3-hand" in args.methods and budget.unit == "values" and (args.dataset, ipc) in HAND_SIZED:
            d3_runs["D3-hand"] = (hand_sized_config(args.dataset, ipc, config_path, folder), overrides,
                                  folder / "d3_hand")
        held_out = KeptScores(folder, lambda c=config: held_out_scorer(c, train_images(), len(test.class_names)),
                              settings_of)
        for method, (d3_config, d3_args, run) in d3_runs.items():
            d3_settings = settings_of(method)
            if not is_done(folder, method, d3_settings):
                row = chosen_d3_row(method, d3_config, d3_args, out / "shared", run, args.seeds, teacher, held_out,
                                    earlier_row(folder, method, d3_settings))
                save_row(folder, method, {**key, "settings": d3_settings}, row)
        # the baselines get the whole budget, which D3 fills only to 90-100 %: the comparison favours them
        baselines = [m for m in ("prototypes", "R+H", "R+S", "R+S-low")
                     if (m in args.methods or m == "R+S" and "R+S-low" in args.methods)  # R+S-low needs R+S's row
                     and not is_done(folder, m, settings_of(m))]
        if "prototypes" in baselines:
            row = prototype_row(config, shared, train, test, teacher, budget, args.seeds, held_out,
                                earlier_row(folder, "prototypes", settings_of("prototypes")))
            save_row(folder, "prototypes", {**key, "settings": settings_of("prototypes")}, row)
        if real := [m for m in baselines if m != "prototypes"]:
            r_plus_s = saved_row(folder, "R+S") if "R+S" not in real else None
            earlier = {m: earlier_row(folder, m, settings_of(m)) for m in real}
            for method, row in real_rows(config, train_images(), test, teacher, budget, args.seeds, real, held_out,
                                         r_plus_s and r_plus_s["row"], earlier).items():
                save_row(folder, method, {**key, "settings": settings_of(method)}, row)
        # methods within 2 std of another get students with the next seeds, until no close pair has too few
        rows = {m: saved_row(folder, m)["row"] for m in args.methods
                if is_done(folder, m, settings_of(m))}
        while todo := sorted(m for m in close_methods(rows) if len(rows[m]["accuracies"]) < args.close_seeds):
            method, row = todo[0], rows[todo[0]]
            sampler, run_config = top_up_sampler(method, row, config, folder, shared, train, test, teacher,
                                                 budget, train_images() if method in ("R+H", "R+S", "R+S-low")
                                                 else None)
            done = len(row["accuracies"])
            row["accuracies"] += evaluate(run_config, sampler, args.close_seeds - done, first_seed=done).accuracies
            save_row(folder, method, {**key, "settings": settings_of(method)}, row)
    merge_and_plot(args.output_dir, figure)


if __name__ == "__main__":
    main()
