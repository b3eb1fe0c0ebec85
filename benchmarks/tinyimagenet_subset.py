"""A subset of the local Tiny ImageNet small enough to travel to a lent GPU machine (64 MiB of files in all, the
code and the wheels it needs included: docs/gpu.md).

    python benchmarks/tinyimagenet_subset.py [--train_per_class 100] [--test_per_class N]
        [--source ../shared/data/tiny-imagenet-200] [--output_dir outputs/gpu_tinyimagenet/subset]

Writes `<output_dir>/data/train-00000-of-00001.parquet` and `test-...`: a seeded random `--train_per_class` training
images of every class and `--test_per_class` test images of every class (default: the whole test split), rows in the
source's order, the JPEG bytes as they are (no decoding; the file zstd-compressed), and the source's schema, whose
`huggingface` metadata keeps the ClassLabel of 200 names, so `datasets.load_dataset(output_dir)` reads it as it reads
the source. 100 images per class and the whole test split come to about 38 MiB.
"""

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def per_class_rows(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Row indices of a seeded random `per_class` rows of every label (all rows when None), ascending."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def write_split(source: Path, split: str, per_class: int | None, seed: int, output_dir: Path) -> Path:
    """The subset of one split of `source` (its `data/<split>-*.parquet` files) as one parquet file."""
    files = sorted((source / "data").glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {source / 'data'}/{split}-*.parquet; valid: a folder laid out as "
                                "../shared/data/tiny-imagenet-200 (data/train-*.parquet, data/test-*.parquet)")
    table = pa.concat_tables(pq.read_table(f) for f in files)  # one schema, its metadata included
    rows = per_class_rows(table.column("label").to_numpy(), per_class, seed)
    subset = table.take(pa.array(rows))
    path = output_dir / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(subset, path, compression="zstd", compression_level=9)  # a quarter smaller than uncompressed
    counts = pc.value_counts(subset.column("label"))
    print(f"{split}: {len(subset):,} images of {len(counts)} classes, {path.stat().st_size / 2**20:.1f} MiB -> {path}")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared/data/tiny-imagenet-200")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs/gpu_tinyimagenet/subset")
    parser.add_argument("--train_per_class", type=int, default=100)
    parser.add_argument("--test_per_class", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    written = [write_split(args.source, "train", args.train_per_class, args.seed, args.output_dir),
               write_split(args.source, "test", args.test_per_class, args.seed, args.output_dir)]
    print(f"subset: {sum(p.stat().st_size for p in written) / 2**20:.1f} MiB in {args.output_dir}")


if __name__ == "__main__":
    main()
