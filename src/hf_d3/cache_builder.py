"""The image cache, building side: decode a map-style dataset in parallel worker processes, or a stream split
over the ranks, into a staged folder that appears under its final name only once complete (`hf_d3.atomic.staged`).
`hf_d3.data.image_cache` decides when to build and holds the lock."""

from __future__ import annotations

import inspect
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import Dataset, IterableDataset
from filelock import FileLock

from .atomic import staged
from .cached_images import CACHE_FORMAT, decode_image
from .progress import progress_bar

logger = logging.getLogger(__name__)
# Images a worker decodes per task: large enough to amortise the task, small enough for a smooth progress bar and
# little memory per worker (4096 x 64 x 64 x 3 = 50 MB).
DECODE_CHUNK = 4096
# Below this many images, decoding in the calling process is faster than starting worker processes.
PARALLEL_FROM = 8192


def _write_index(staging: Path, labels: np.ndarray, class_names: list[str], meta: dict) -> None:
    """labels.npy, the per-class index and meta.json (written last) of a cache being staged."""
    outside = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if outside.size:
        raise ValueError(f"row {outside[0]} has label {labels[outside[0]]}, which is not a class id; valid: 0 to "
                         f"{len(class_names) - 1} (-1 marks a missing label: drop those rows first)")
    np.save(staging / "labels.npy", labels)
    np.save(staging / "class_rows.npy", np.argsort(labels, kind="stable"))  # ascending rows within each class
    np.save(staging / "class_offsets.npy", np.concatenate([[0], np.cumsum(np.bincount(labels,
                                                                                      minlength=len(class_names)))]))
    (staging / "meta.json").write_text(json.dumps({**meta, "class_names": class_names, "num_images": len(labels),
                                                   "format": CACHE_FORMAT, "built_by": socket.gethostname()}))


# The dataset a decoding worker reads: inherited through fork, never pickled (set by `_start_worker`).
_worker_dataset: Dataset | None = None


def _start_worker(dataset: Dataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset
    torch.set_num_threads(1)


def _decode_rows(dataset: Dataset | None, path: Path, start: int, end: int, resolution: int, channels: int,
                 image_column: str) -> int:
    """Decode rows [start, end) of `dataset` (a worker's own when None) into the staged images.npy."""
    dataset = _worker_dataset if dataset is None else dataset
    rows = dataset.select(range(start, end)).select_columns([image_column])
    out = np.load(path, mmap_mode="r+")
    for i, image in enumerate(rows[image_column]):
        out[start + i] = decode_image(image, resolution, channels)
    out.flush()
    del out  # unmapped: the written pages leave this process's resident memory
    return end - start


def build_from_dataset(dataset: Dataset, folder: Path, resolution: int, channels: int, image_column: str,
                        label_column: str, num_workers: int) -> None:
    """Decode and resize every image of a map-style `dataset` into the cache `folder` (uint8, by class), in
    `num_workers` processes."""
    labels = np.asarray(dataset[label_column], dtype=np.int64)
    n, start_time = len(labels), time.perf_counter()
    chunks = [(start, min(start + DECODE_CHUNK, n)) for start in range(0, n, DECODE_CHUNK)]
    workers = min(num_workers, len(chunks)) if n >= PARALLEL_FROM else 1
    with staged(folder) as staging:  # we hold the lock: what a killed builder left is removed
        staging.mkdir()
        path = staging / "images.npy"
        # the header and the file's full size; the workers fill the rows in place
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, resolution, resolution, channels)).flush()
        bar = progress_bar(None, total=n, desc=f"decoding {dataset.split or 'images'} ({workers} process(es))",
                           unit="image", leave=False)
        task = (path, resolution, channels, image_column)
        if workers == 1:
            for start, end in chunks:
                bar.update(_decode_rows(dataset, task[0], start, end, *task[1:]))
        else:
            # fork: the workers inherit the dataset (Arrow tables are memory-mapped) instead of unpickling a copy
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                     initargs=(dataset,)) as pool:
                futures = [pool.submit(_decode_rows, None, task[0], start, end, *task[1:]) for start, end in chunks]
                try:
                    for future in as_completed(futures):
                        bar.update(future.result())
                except BaseException:  # an undecodable image: say so now, not after every other chunk ran
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        bar.close()
        _write_index(staging, labels, list(dataset.features[label_column].names),
                     {"resolution": resolution, "channels": channels, "source": dataset._fingerprint,
                      "image_column": image_column, "label_column": label_column})
    logger.info("image cache: decoded %d images at %dx%dx%d with %d process(es) in %.1f s into %s", n, resolution,
                resolution, channels, workers, time.perf_counter() - start_time, folder)


def _wait_for(ready, timeout_s: float, what: str) -> None:
    """Poll `ready()` until it is true (the ranks building a stream's cache share a folder, not a process group)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}; the ranks must share the cache folder "
                               "(HF_D3_CACHE on one machine or on a shared filesystem), and all of them must build it")
        time.sleep(0.5)


def build_from_stream(stream: IterableDataset, folder: Path, resolution: int, channels: int, image_column: str,
                       label_column: str, timeout_s: float = 7200) -> None:
    """Every rank decodes every `world`-th example (its `split_dataset_by_node` share) into a part; the first rank
    to take the lock interleaves the parts back into the stream's order, so the cache does not depend on the number
    of ranks."""
    from datasets.distributed import split_dataset_by_node

    # what every launcher (accelerate launch, torchrun, SLURM through them) sets; no process group is needed, the
    # ranks meet in the cache folder
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    parts = folder.with_name(f"{folder.name}.parts-of-{world}")
    part = parts / f"part-{rank}"
    start_time = time.perf_counter()
    if not (part / "labels.npy").is_file():  # a part finished by an earlier, interrupted build is reused
        if world > 1 and "strategy" not in inspect.signature(split_dataset_by_node).parameters:
            raise RuntimeError(f"datasets {datasets.__version__} cannot split a stream example by example "
                               "(split_dataset_by_node(strategy='examples')); valid: a newer datasets, or "
                               "streaming=False")
        # example by example, not shard by shard: example i goes to rank i % world, so the joined cache has the
        # stream's order whatever the number of ranks or shards
        share = split_dataset_by_node(stream, rank, world, strategy="examples") if world > 1 else stream
        labels = []
        with staged(part) as staging:
            staging.mkdir()
            with open(staging / "images.bin", "wb") as out:
                for example in progress_bar(share.select_columns([image_column, label_column]),
                                            desc=f"decoding stream (rank {rank}/{world})", unit="image", leave=False):
                    out.write(decode_image(example[image_column], resolution, channels).tobytes())
                    labels.append(example[label_column])
            np.save(staging / "labels.npy", np.asarray(labels, dtype=np.int64))
    finished = folder / "meta.json"
    _wait_for(lambda: finished.is_file() or all((parts / f"part-{r}" / "labels.npy").is_file() for r in range(world)),
              timeout_s, f"the parts of the {world} ranks in {parts}")
    with FileLock(str(folder) + ".lock"):
        if not finished.is_file():
            part_labels = [np.load(parts / f"part-{r}" / "labels.npy") for r in range(world)]
            n, shape = sum(map(len, part_labels)), (resolution, resolution, channels)
            labels = np.empty(n, dtype=np.int64)
            with staged(folder) as staging:
                staging.mkdir()
                out = np.lib.format.open_memmap(staging / "images.npy", mode="w+", dtype=np.uint8, shape=(n, *shape))
                for r in range(world):  # example i of the stream went to rank i % world, as its (i // world)-th
                    labels[r::world] = part_labels[r]
                    if not len(part_labels[r]):  # a stream shorter than the ranks: nothing to map
                        continue
                    source = np.memmap(parts / f"part-{r}" / "images.bin", dtype=np.uint8, mode="r",
                                       shape=(len(part_labels[r]), *shape))
                    for start in range(0, len(source), DECODE_CHUNK):
                        chunk = source[start:start + DECODE_CHUNK]
                        out[r + world * start:r + world * (start + len(chunk)):world] = chunk
                        out.flush()
                    del source
                del out
                _write_index(staging, labels, list(stream.features[label_column].names),
                             {"resolution": resolution, "channels": channels, "source": "stream",
                              "image_column": image_column, "label_column": label_column})
            shutil.rmtree(parts)  # a rank still waiting sees the finished cache instead
            logger.info("image cache: %d streamed images over %d rank(s) in %.1f s into %s", n, world,
                        time.perf_counter() - start_time, folder)
