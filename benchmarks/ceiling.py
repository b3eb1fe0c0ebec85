"""The ceiling of a config's protocol: its network (`architecture`, `net_width`, `net_depth`) trained on every
training image as the run's relabelling teacher is (`hf_d3.teacher.load_teacher`), scored on the test split.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/ceiling.py --config recipes/configs/tinyimagenet_cpu.yaml \
        --dataset ../shared/data/tiny-imagenet-200 --test_split test

The network is the config's teacher stage (`hf_d3.stages`, under its `stage_dir`, default `output_dir`): a rerun
reuses it instead of training again, and a D3 run of the same settings naming that `stage_dir` relabels with it.
Writes its record to benchmarks/results/ceiling.json (regenerate BENCHMARKS.md with benchmarks/report.py).
"""

import resource
import sys
import time

import torch
from record import save_record  # this folder is on sys.path when the script runs

from hf_d3.config_parser import parse_config
from hf_d3.data import class_names_of, load_split, load_test_images
from hf_d3.evaluation import accuracy
from hf_d3.run_plan import make_plan
from hf_d3.teacher import load_teacher


def main():
    config = parse_config(sys.argv[1:])
    data = config.data
    train = load_split(data, data.train_split)
    plan = make_plan(config, class_names_of(data, train), "no")
    start = time.perf_counter()
    teacher = load_teacher(config, plan, train, torch.device("cpu"))
    trained = plan.teacher.read_result(plan.stage_dir)
    test = load_test_images(data)
    score = accuracy(teacher, test.images, test.labels)
    figures = {"test_accuracy": round(100 * score, 2), "training_images": trained["training_images"],
               "train_wall_time_s": round(trained["wall_time_s"], 1), "test_images": len(test.labels),
               "threads": torch.get_num_threads(), "this_process_wall_time_s": round(time.perf_counter() - start, 1),
               "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    settings = {"dataset": data.dataset, "resolution": data.resolution, "channels": data.channels,
                "architecture": config.experts.architecture, "net_width": config.experts.net_width,
                "net_depth": config.experts.net_depth, "epochs": config.relabel.teacher_epochs,
                "lr": config.experts.expert_lr, "batch_size": config.experts.expert_batch_size,
                "augment": config.experts.expert_augment, "stage": plan.teacher.folder(plan.stage_dir).name}
    save_record("ceiling", settings, figures)
    print(f"ceiling of {data.dataset} at {data.resolution}px: {figures['test_accuracy']:.2f} % "
          f"({config.experts.architecture} width {config.experts.net_width} depth {config.experts.net_depth}, "
          f"{config.relabel.teacher_epochs} epochs on {trained['training_images']} images, "
          f"{trained['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
