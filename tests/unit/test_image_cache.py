"""The image cache (`hf_d3.data.ImageCache`): what it returns is what decoding every image in memory returned before
it existed, bit for bit and in the same order; it is built once, in parallel, atomically, by one process at a time,
from a map-style or a streaming dataset; and the consumers draw the same images from it as from a tensor."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_RUN, write_parquet_dataset
from datasets import ClassLabel, Dataset, Features, Image, Value, load_dataset
from safetensors.torch import load_file

import hf_d3.cache_builder
import hf_d3.data
from hf_d3.config import DataConfig
from hf_d3.data import CachedImages, RealImages, cache_folder, image_cache, load_images, load_split
from hf_d3.distill.losses import class_mmd_parts
from hf_d3.distill.warm_start import warm_start
from hf_d3.experts import train_classifier
from hf_d3.factories import build_decoder, build_latent_store
from hf_d3.models.classifiers import build_classifier

ROOT = Path(__file__).resolve().parents[2]
OLD_COMMIT = "4634833"  # the last commit that decoded into one float tensor (to_tensors)
MODES = ["L", "RGB", "RGBA", "P", "LA"]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """4 classes x 9 images of every mode, several sizes (some need the bicubic resize, some not) and two
    encodings (PNG, JPEG), each with its own random content, as a local Parquet dataset."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(36):
        size = [(12, 12), (16, 16), (20, 9), (7, 30)][i % 4]
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = PIL.Image.fromarray(pixels).convert(MODES[i % len(MODES)])
        buffer = io.BytesIO()
        if i % 5 == 0 and image.mode in ("L", "RGB"):
            image.save(buffer, format="JPEG", quality=85)
        else:
            image.save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(int(rng.integers(0, 4)))
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c", "d"])})
    dataset = Dataset.from_dict({"image": images, "label": labels}, features=features)
    return write_parquet_dataset(tmp_path_factory.mktemp("mixed"), {"train": dataset})


def old_decode(dataset: Dataset, resolution: int, channels: int, classes=None, max_per_class=None, seed=0):
    """What `to_tensors` of the old data path returned (commit 4634833), written out here: the kept rows (classes
    filtered, then a seeded subset per class, in the dataset's order), each image PIL-converted to L / RGB, resized
    bicubic when its size differs, as float32 [N, C, H, W] / 255."""
    labels = np.asarray(dataset["label"])
    keep = np.arange(len(labels)) if classes is None else np.flatnonzero(np.isin(labels, list(classes)))
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.permutation(keep[labels[keep] == c])[:max_per_class]
                               for c in np.unique(labels[keep])])
        keep.sort()
    images = np.empty((len(keep), resolution, resolution, channels), dtype=np.uint8)
    for i, image in enumerate(dataset.select(keep)["image"]):
        image = image.convert({1: "L", 3: "RGB"}[channels])
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), resample=3)
        images[i] = np.asarray(image).reshape(resolution, resolution, channels)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255), torch.from_numpy(labels[keep]).long()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("selection", [{}, {"classes": [2, 0]}, {"max_per_class": 3, "seed": 5},
                                       {"classes": [1, 3], "max_per_class": 4, "seed": 1}])
def test_cache_returns_the_old_decode_bit_for_bit(mixed_folder, channels, selection):
    dataset = load_dataset(str(mixed_folder), split="train")
    expected, expected_labels = old_decode(dataset, 16, channels, **selection)
    got = load_images(dataset, 16, channels, **selection)
    assert isinstance(got.images, CachedImages) and got.images.shape == expected.shape
    assert torch.equal(got.labels, expected_labels)
    assert torch.equal(got.images[:], expected)  # every image, in the same order, bit for bit
    index = torch.randint(len(expected), (50,), generator=torch.Generator().manual_seed(0))  # repeats, any order
    assert torch.equal(got.images[index], expected[index])
    assert torch.equal(got.images[got.labels == got.labels[0]], expected[expected_labels == expected_labels[0]])
    assert torch.equal(got.images[3], expected[3]) and torch.equal(got.images[2:7], expected[2:7])


def test_cache_by_class_and_its_files(mixed_folder):
    dataset = load_dataset(str(mixed_folder), split="train")
    cache = image_cache(dataset, 12, 3)
    labels = np.asarray(dataset["label"])
    assert cache.folder == cache_folder(dataset._fingerprint, "train", 12, 3, "image", "label")
    for c in range(4):
        assert cache.class_indices(c).tolist() == np.flatnonzero(labels == c).tolist()
    with pytest.raises(ValueError, match="class_id=4 is not a class of this cache; valid: 0 to 3"):
        cache.class_indices(4)
    stored = np.load(cache.folder / "images.npy", mmap_mode="r")  # plain NumPy: readable without hf_d3
    assert stored.dtype == np.uint8 and stored.shape == (36, 12, 12, 3)
    assert np.array_equal(stored[[5, 1]], cache.read(np.array([5, 1])))
    with pytest.raises(IndexError, match="row 36 is outside the image cache"):
        cache.read(np.array([36]))
    # a batch comes back on the images' device (the meta device stands in for a GPU)
    on_device = CachedImages(cache, np.arange(36)).to("meta")[torch.tensor([5, 1])]
    assert on_device.device.type == "meta" and on_device.dtype == torch.float32 and on_device.shape == (2, 3, 12, 12)


def test_parallel_build_equals_serial_and_is_reused(mixed_folder, monkeypatch, tmp_path):
    dataset = load_dataset(str(mixed_folder), split="train")
    serial = image_cache(dataset, 10, 3)
    monkeypatch.setattr(hf_d3.data, "CACHE_DIR", tmp_path / "parallel")
    monkeypatch.setattr(hf_d3.cache_builder, "PARALLEL_FROM", 0)  # worker processes even for 36 images
    monkeypatch.setattr(hf_d3.cache_builder, "DECODE_CHUNK", 5)  # 8 chunks over 2 workers
    parallel = image_cache(dataset, 10, 3, num_workers=2)
    assert parallel.folder != serial.folder
    assert np.array_equal(parallel.read(np.arange(36)), serial.read(np.arange(36)))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a finished cache was built again")

    monkeypatch.setattr(hf_d3.cache_builder, "build_from_dataset", no_rebuild)
    assert np.array_equal(image_cache(dataset, 10, 3).read(np.arange(36)), serial.read(np.arange(36)))


def test_an_undecodable_image_stops_a_parallel_build_and_publishes_nothing(mixed_folder, monkeypatch, tmp_path):
    dataset = load_dataset(str(mixed_folder), split="train").cast_column("image", Image(decode=False))
    broken = dataset.map(lambda row, i: {"image": {"bytes": b"not an image", "path": None}} if i == 7 else row,
                         with_indices=True).cast_column("image", Image())
    monkeypatch.setattr(hf_d3.data, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(hf_d3.cache_builder, "PARALLEL_FROM", 0)
    monkeypatch.setattr(hf_d3.cache_builder, "DECODE_CHUNK", 5)
    with pytest.raises(PIL.UnidentifiedImageError):
        image_cache(broken, 10, 3, num_workers=2)
    assert not list(tmp_path.rglob("meta.json"))  # no cache that looks finished (meta.json is written last)


BUILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from datasets import load_dataset
    import hf_d3.cache_builder as builder
    import hf_d3.data as data
    built = []
    build = builder.build_from_dataset
    builder.build_from_dataset = lambda *args: (built.append(1), build(*args))
    cache = data.image_cache(load_dataset(sys.argv[1], split="train"), int(sys.argv[2]), 3)
    print(json.dumps({"built": len(built), "checksum": int(cache.read(np.arange(len(cache))).astype(np.int64).sum()),
                      "folder": str(cache.folder)}))
""")


def test_a_build_killed_before_it_is_published_leaves_no_cache(mixed_folder, tmp_path, monkeypatch):
    """SIGKILLed with the cache written in full but not yet under its name: no finished-looking cache remains, and
    the next build replaces the leftover."""
    dataset = load_dataset(str(mixed_folder), split="train")
    monkeypatch.setattr(hf_d3.data, "CACHE_DIR", tmp_path)
    folder = cache_folder(dataset._fingerprint, "train", 14, 3, "image", "label")
    killed = subprocess.run([sys.executable, "-c", BUILD, str(mixed_folder), "14"], capture_output=True, text=True,
                            env={**os.environ, "HF_D3_CACHE": str(tmp_path), "HF_D3_KILL_AT": f"write {folder.name}:1"})
    assert killed.returncode == -9, killed.stderr
    assert not folder.exists() and list(folder.parent.glob(f"{folder.name}.partial-*"))  # the leftover, unpublished
    rebuilt = image_cache(dataset, 14, 3)
    assert rebuilt.folder == folder and len(rebuilt) == 36
    assert not list(folder.parent.glob(f"{folder.name}.partial-*"))


def test_concurrent_processes_build_one_cache(mixed_folder, tmp_path):
    env = {**os.environ, "HF_D3_CACHE": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", BUILD, str(mixed_folder), "15"], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = [json.loads(p.communicate()[0]) for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert sum(r["built"] for r in results) == 1  # the others waited for the lock, then opened the one built
    assert len({(r["checksum"], r["folder"]) for r in results}) == 1


STREAM = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from datasets import load_dataset
    from hf_d3.data import image_cache
    stream = load_dataset(sys.argv[1], split="train", streaming=True)
    cache = image_cache(stream, 16, 3, source="mixed:train")
    print(json.dumps({"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
                      "folder": str(cache.folder), "images": cache.read(np.arange(len(cache))).tolist(),
                      "labels": cache.labels.tolist()}))
""")


def test_a_stream_split_over_two_ranks_gives_the_map_style_cache(mixed_folder, tmp_path):
    """Two gloo ranks each decode every other example of the stream (`split_dataset_by_node`); the joined cache holds
    the images in the stream's order, as the cache of the map-style dataset does."""
    script = tmp_path / "stream.py"
    script.write_text(STREAM)
    env = {**os.environ, "HF_D3_CACHE": str(tmp_path / "cache"), "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                           str(mixed_folder)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted((r["rank"], r["world"]) for r in ranks) == [(0, 2), (1, 2)]
    assert ranks[0]["images"] == ranks[1]["images"] and ranks[0]["folder"] == ranks[1]["folder"]
    assert not list(Path(ranks[0]["folder"]).parent.glob("*.parts-of-*"))  # the parts are gone once joined
    mapped = image_cache(load_dataset(str(mixed_folder), split="train"), 16, 3)
    assert np.array_equal(np.asarray(ranks[0]["images"], dtype=np.uint8), mapped.read(np.arange(len(mapped))))
    assert ranks[0]["labels"] == mapped.labels.tolist()


def test_streams_need_a_source_name(mixed_folder):
    stream = load_dataset(str(mixed_folder), split="train", streaming=True)
    with pytest.raises(ValueError, match="name it with source="):
        image_cache(stream, 16, 3)
    with pytest.raises(ValueError, match="channels=2 is not supported; valid: 1"):
        image_cache(stream, 16, 2, source="x")


def test_bad_inputs_of_the_cache_are_refused(mixed_folder):
    dataset = load_dataset(str(mixed_folder), split="train")
    cache = image_cache(dataset, 12, 3)
    with pytest.raises(ValueError, match="holds 12x12x3 images, not resolution=16, channels=3"):
        load_images(cache, 16, 3)
    # -1 is datasets' mark of a missing label
    unlabelled = dataset.cast_column("label", Value("int64"))
    unlabelled = unlabelled.map(lambda row, i: {"label": -1 if i == 3 else row["label"]}, with_indices=True)
    unlabelled = unlabelled.cast_column("label", ClassLabel(names=["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="row 3 has label -1, which is not a class id"):
        image_cache(unlabelled, 12, 3)
    with pytest.raises(ValueError, match="streaming=True reads 'builtin:fashion_mnist'"):
        load_split(DataConfig(dataset="builtin:fashion_mnist", streaming=True), "train")


def test_consumers_draw_the_same_from_the_cache_as_from_a_tensor(fmnist4_tensors):
    """Experts, warm start and MMD given the cached images compute exactly what they compute given the same images
    as one tensor in memory: they index the same images in the same order."""
    cached = fmnist4_tensors.images
    assert isinstance(cached, CachedImages)
    in_memory = cached[:]
    results = []
    for images in (cached, in_memory):
        data = RealImages(images, fmnist4_tensors.labels, [0, 1, 2, 3])
        torch.manual_seed(0)
        net = build_classifier("convnet", 1, 16, 4, width=8, depth=2)
        trajectory = train_classifier(net, data.images, data.labels, 1, 0.01, 16, torch.Generator().manual_seed(1))
        from hf_d3.config import D3Config

        config = D3Config.from_dict({**TINY_RUN, "dataset": "x"})
        torch.manual_seed(0)
        store = build_latent_store(config.representation, [0, 1, 2, 3], ["a", "b", "c", "d"])
        decoder = build_decoder(config.representation, config.data)
        generator = torch.Generator().manual_seed(2)
        mse = warm_start(store, decoder, data, 3, lr=1e-3, generator=generator)
        mmd = sum(class_mmd_parts(store, decoder, data, lambda x, net=net: net(x).logits, 4, [1.0, 2.0], generator))
        results.append((torch.stack(trajectory), mse, store.mean.detach().clone(), mmd.detach()))
    (t1, m1, mu1, d1), (t2, m2, mu2, d2) = results
    assert torch.equal(t1, t2) and m1 == m2 and torch.equal(mu1, mu2) and torch.equal(d1, d2)


def test_cached_images_index_like_a_tensor(fmnist4_tensors):
    cached = fmnist4_tensors.images
    everything = cached[:]
    mask = torch.zeros(len(everything), dtype=torch.bool)
    mask[[0, 2, 5]] = True
    for index in (mask.tolist(), mask.numpy(), mask, [5, 0, 0], np.array([5, 0, 0]), torch.tensor([5, 0, 0])):
        assert torch.equal(cached[index], everything[torch.as_tensor(index)]), type(index)


RUN = textwrap.dedent("""
    import json, sys
    from hf_d3.config import D3Config
    from hf_d3.run import run_distillation
    result = run_distillation(D3Config.from_dict(json.loads(sys.argv[1])))
    print(json.dumps({"accuracy": result.metrics.accuracies, "teacher": result.metrics.teacher_accuracy}))
""")


def test_a_run_gives_the_old_data_paths_result(tmp_path, fmnist4_folder):
    """The same tiny run (same seed, fp32) with the code of the old data path (commit 4634833, unpacked from git)
    and with this checkout's: the pipelines are equal bit for bit, and so are the accuracies."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", OLD_COMMIT, "src"],
                             capture_output=True)
    if archive.returncode:
        pytest.skip(f"commit {OLD_COMMIT} is not in this checkout's history (a shallow clone)")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp_path / "old", filter="data")
    outputs = {}
    for name, src in (("old", tmp_path / "old" / "src"), ("new", ROOT / "src")):
        config = {"dataset": str(fmnist4_folder), **TINY_RUN, "output_dir": str(tmp_path / name), "init": "real"}
        if name == "new":
            config["hard_label_weight"] = 0.0  # the old code's labels: the teacher's alone (the old code lacks the key)
        done = subprocess.run([sys.executable, "-c", RUN, json.dumps(config)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(src)}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = json.loads(done.stdout.splitlines()[-1])
    assert outputs["old"] == outputs["new"]
    for component in ("latent_store", "decoder"):
        old, new = (load_file(str(next((tmp_path / name / "pipeline" / component).glob("*.safetensors"))))
                    for name in ("old", "new"))
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_a_streaming_run_gives_the_map_style_runs_result(tmp_path, tiny_run):
    """`streaming: true` reads the splits as streams into the image cache; the cache holds the same images in the
    same order, so the run is the same bit for bit."""
    from hf_d3.run import run_distillation

    runs = {streaming: run_distillation(tiny_run(output_dir=str(tmp_path / f"streaming_{streaming}"),
                                                 streaming=streaming))
            for streaming in (False, True)}
    assert runs[True].metrics.accuracies == runs[False].metrics.accuracies
    assert runs[True].metrics.teacher_accuracy == runs[False].metrics.teacher_accuracy
    for name in ("latent_store", "decoder"):
        a, b = (getattr(runs[s].pipeline, name).state_dict() for s in (False, True))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
