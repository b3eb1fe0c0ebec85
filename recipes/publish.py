"""Publish a finished run folder to the Hub: `python recipes/publish.py outputs/fashion_mnist user/fmnist-d3
[--dataset user/fmnist-d3-data]`. The token comes from HF_TOKEN or `hf auth login`."""

import argparse

from hf_d3.hub import publish_run


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="a run's output_dir (with pipeline/ and metrics.json)")
    parser.add_argument("hub_model_id", help="the pipeline repo, e.g. user/fashion-mnist-d3")
    parser.add_argument("--dataset", dest="hub_dataset_id", help="also publish the materialised dataset here")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()
    commits = publish_run(args.run_dir, args.hub_model_id, args.hub_dataset_id, private=args.private)
    for what, commit in commits.items():
        print(f"{what}: {commit}")


if __name__ == "__main__":
    main()
