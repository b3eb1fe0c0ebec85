"""Publish a finished run folder to the Hub, with the run's settings (`config.json`) and any override:

    python recipes/publish.py outputs/fashion_mnist --hub_model_id user/fmnist-d3 [--hub_dataset_id user/fmnist-d3-data]

Settings are `D3Config`'s, parsed as `recipes/distill.py` parses them; `hub_model_id`, `hub_dataset_id` and
`hub_private` say where to. The token comes from HF_TOKEN or `hf auth login`.
"""

import sys
from pathlib import Path

from hf_d3.cli import run_recipe
from hf_d3.config_parser import parse_config
from hf_d3.run_folder import publish_run


def main():
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    run_dir, args = Path(sys.argv[1]), sys.argv[2:]
    if (run_dir / "config.json").is_file() and "--config" not in args:
        args = ["--config", str(run_dir / "config.json"), *args]
    hub = parse_config(args).hub
    if not hub.hub_model_id:
        sys.exit("give the pipeline repo: --hub_model_id user/name")
    commits = publish_run(run_dir, hub.hub_model_id, hub.hub_dataset_id, private=hub.hub_private)
    for what, commit in commits.items():
        print(f"{what}: {commit}")


if __name__ == "__main__":
    run_recipe(main)
