"""Distil a dataset with D3: `accelerate launch recipes/distill.py --config recipes/configs/fashion_mnist.yaml`.

Any config field can be overridden on the command line, e.g. `--iterations 50 --output_dir outputs/try`.
"""

from datetime import timedelta

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from hf_d3.config import parse_config
from hf_d3.run import run_distillation


def main():
    config = parse_config()
    # A rank waits at most this long for its peers, so a dead peer cannot hang the job forever.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.run.collective_timeout_s))
    accelerator = Accelerator(kwargs_handlers=[timeout])
    result = run_distillation(config, accelerator)
    if result is not None:
        m = result.metrics
        print(f"test accuracy {100 * m.accuracy_mean:.2f} +- {100 * m.accuracy_std:.2f} % "
              f"({m.num_eval_runs} students), storage {m.storage['total_values']:,} values = "
              f"{m.storage['ipc_equivalent']:.2f} IPC-equivalent; saved to {config.run.output_dir}")


if __name__ == "__main__":
    main()
