"""Distil a dataset with D3: `accelerate launch recipes/distill.py --config recipes/configs/fashion_mnist.yaml`.

Any config field can be overridden on the command line, e.g. `--iterations 50 --output_dir outputs/try`.
Progress goes to the log (hf_d3's loggers at INFO on the main process, WARNING elsewhere, as transformers' Trainer
does it) and, with `--report_to tensorboard` (or wandb, ...), to Accelerate's trackers under `<output_dir>/logs`.
"""

import logging

from hf_d3.cli import run_recipe
from hf_d3.config_parser import parse_config
from hf_d3.run import make_accelerator, run_distillation


def main():
    config = parse_config()
    accelerator = make_accelerator(config.run)  # a rank waits at most collective_timeout_s for its peers
    # One process tells the story; the others speak up only for warnings and errors (the rank says whose). INFO is
    # for hf_d3's own loggers: at INFO, libraries such as httpx log every request.
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s rank {accelerator.process_index} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_d3").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    result = run_distillation(config, accelerator)
    accelerator.end_training()  # trackers closed, process group ended
    if result is not None:
        m = result.metrics
        print(f"test accuracy {100 * m.accuracy_mean:.2f} +- {100 * m.accuracy_std:.2f} % "
              f"({m.num_eval_runs} students), storage {m.storage['total_values']:,} values = "
              f"{m.storage['ipc_equivalent']:.2f} IPC-equivalent; saved to {config.run.output_dir}")


if __name__ == "__main__":
    run_recipe(main)
