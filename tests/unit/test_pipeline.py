"""D3Pipeline: save / load, every output type and option, subtask routing, storage counts, bad folders."""

from __future__ import annotations

import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open

from hf_d3 import D3Decoder, D3Pipeline, D3PipelineOutput, GaussianLatentStore
from hf_d3.pipelines.pipeline_d3 import DECODE_SLICE_SIZE
from hf_d3.storage import prototype_storage

NAMES = ["zero", "one", "two"]


def make_pipe(seed: int = 0, out_channels: int = 1) -> D3Pipeline:
    """3 classes x 2 components in 8-d; classes 0-1 are subtask 0, class 2 is subtask 1 (its own generator)."""
    torch.manual_seed(seed)
    store = GaussianLatentStore(class_ids=[0, 1, 2], num_classes=3, latents_per_class=2, latent_dim=8,
                                class_names=NAMES, subtask_sizes=[2, 1])
    decoder = D3Decoder(latent_dim=8, resolution=8, out_channels=out_channels, channels=[8, 4], num_subtasks=2)
    with torch.no_grad():  # distinct soft labels per component, and non-trivial BatchNorm statistics
        store.soft_labels.copy_(torch.rand(6, 3).softmax(1))
        for generator in decoder.generators:
            generator.body[1].running_mean.uniform_(-0.5, 0.5)
            generator.body[1].running_var.uniform_(0.5, 2.0)
    return D3Pipeline(latent_store=store, decoder=decoder)


def draw(pipe: D3Pipeline, seed: int = 0, **kwargs) -> D3PipelineOutput:
    kwargs = {"num_samples_per_component": 2, "include_means": True, "output_type": "pt", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture
def pipe() -> D3Pipeline:
    return make_pipe()


def test_save_and_load_gives_identical_outputs(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = D3Pipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.latent_store, GaussianLatentStore) and isinstance(loaded.decoder, D3Decoder)
    assert loaded.latent_store.class_names == NAMES and len(loaded.decoder.generators) == 2
    a, b = draw(pipe, seed=3), draw(loaded, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.soft_labels, b.soft_labels)
    assert not torch.equal(draw(loaded, seed=4).images, b.images)  # the seed matters: the check above can fail
    assert loaded.storage_report() == pipe.storage_report()


# How far a stored pipeline's images may be from float32's: a relative error e per stored value moves a pixel of the
# (tanh + 1) / 2 output by about e per layer it passes through, and these pipelines are 3 layers deep (projection,
# transposed convolution, convolution): 3 e, with e = 2**-11 (float16), 2**-8 (bfloat16), 1 / 254 of a channel's
# largest value (int8, rounding to one of 127 steps).
PIXEL_TOLERANCE = {"float16": 3 * 2**-11, "bfloat16": 3 * 2**-8, "int8": 3 / 254}


@pytest.mark.parametrize("storage_dtype", PIXEL_TOLERANCE)
def test_a_pipeline_stored_in_fewer_bits_loads_as_it_draws_within_the_rounding_of_float32(storage_dtype, tmp_path):
    pipe = make_pipe()
    float32 = draw(pipe, seed=3)
    pipe.set_storage_dtype(storage_dtype)
    stored = draw(pipe, seed=3)
    difference = (stored.images - float32.images).abs().max().item()
    assert 0 < difference <= PIXEL_TOLERANCE[storage_dtype]
    assert (stored.soft_labels - float32.soft_labels).abs().max() <= 1 / 254  # per component, of its largest
    pipe.save_pretrained(tmp_path)
    loaded = D3Pipeline.from_pretrained(tmp_path)
    assert loaded.latent_store.dtype == loaded.decoder.dtype == torch.float32
    assert loaded.latent_store.config.storage_dtype == loaded.decoder.config.storage_dtype == storage_dtype
    again = draw(loaded, seed=3)
    assert torch.equal(again.images, stored.images) and torch.equal(again.soft_labels, stored.soft_labels)
    assert loaded.storage_report() == pipe.storage_report()
    assert pipe.storage_report().total_bytes < make_pipe().storage_report().total_bytes / 1.9
    loaded.save_pretrained(tmp_path / "again")  # stored again, it is the same
    assert torch.equal(draw(D3Pipeline.from_pretrained(tmp_path / "again"), seed=3).images, stored.images)


def test_a_storage_dtype_no_file_can_have_is_refused(pipe):
    with pytest.raises(ValueError, match=r"storage_dtype='int4' is not valid; choose one of \['float32', 'float16'"):
        pipe.set_storage_dtype("int4")


def test_same_generator_seed_same_images(pipe):
    assert torch.equal(draw(pipe, seed=1).images, draw(pipe, seed=1).images)
    assert not torch.equal(draw(pipe, seed=1).images, draw(pipe, seed=2).images)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_output_types(channels, mode):
    pipe = make_pipe(out_channels=channels)
    pt = draw(pipe, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (18, channels, 8, 8)  # 6 means + 6 x 2 samples, NCHW
    assert pt.dtype == torch.float32 and pt.min() >= 0 and pt.max() <= 1

    arr = draw(pipe, output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (18, 8, 8, channels)  # NHWC
    assert arr.min() >= 0 and arr.max() <= 1
    assert np.allclose(arr, pt.permute(0, 2, 3, 1).numpy())

    pil = draw(pipe, output_type="pil").images
    assert isinstance(pil, list) and len(pil) == 18
    assert all(isinstance(im, PIL.Image.Image) and im.mode == mode and im.size == (8, 8) for im in pil)
    pixels = np.asarray(pil[5]).reshape(8, 8, channels).astype(float)
    assert np.abs(pixels - arr[5] * 255).max() <= 1.0

    with pytest.raises(ValueError, match="output_type='latent' is not supported"):
        pipe(output_type="latent")
    for count, means in ((-1, True), (0, False)):
        with pytest.raises(ValueError, match=f"num_samples_per_component={count} with include_means={means} draws"):
            pipe(num_samples_per_component=count, include_means=means)
    with pytest.raises(ValueError, match="num_samples_per_component=-1 with include_means=True draws no image"):
        pipe.to_dataset(num_samples_per_component=-1)


def test_return_dict_false_gives_a_tuple(pipe):
    out = draw(pipe, seed=5)
    images, labels, soft_labels = draw(pipe, seed=5, return_dict=False)
    assert torch.equal(images, out.images) and torch.equal(labels, out.labels)
    assert torch.equal(soft_labels, out.soft_labels)


def test_labels_and_soft_labels_follow_the_components(pipe):
    out = draw(pipe, include_means=False, num_samples_per_component=3)
    store = pipe.latent_store
    assert out.labels.tolist() == [0, 0, 1, 1, 2, 2] * 3
    assert torch.equal(out.soft_labels, store.soft_labels.repeat(3, 1))


def test_class_labels_filter(pipe):
    only_two = draw(pipe, class_labels=2)
    assert only_two.labels.tolist() == [2] * 6 and len(only_two.images) == 6
    some = draw(pipe, class_labels=[2, 0], include_means=False, num_samples_per_component=1)
    assert some.labels.tolist() == [0, 0, 2, 2]
    with pytest.raises(ValueError, match=r"class_labels \[7\] are not in this store"):
        pipe(class_labels=[0, 7])
    for one in (np.int64(2), torch.tensor(2)):  # one id, as NumPy and torch give it
        assert torch.equal(draw(pipe, class_labels=one).images, only_two.images)


def test_a_half_precision_load_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="torch_dtype=torch.bfloat16: the decoder always runs in float32"):
        D3Pipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.bfloat16)
    assert D3Pipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.float32).decoder.dtype == torch.float32


def test_means_come_first_and_are_the_decoded_means(pipe):
    out = draw(pipe, seed=0, num_samples_per_component=1)
    store, decoder = pipe.latent_store, pipe.decoder.eval()
    with torch.no_grad():
        means = decoder(store.mean, store.component_subtask).clamp(0, 1)
    assert torch.allclose(out.images[:6], means, atol=1e-6)
    assert out.labels.tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    assert not torch.allclose(out.images[6:], means, atol=1e-3)  # then the samples, which differ from the means
    # decoding does not depend on what else is in the batch (eval-mode BatchNorm): one class alone gives the same means
    alone = draw(pipe, seed=9, class_labels=[1])
    assert torch.allclose(alone.images[:2], means[2:4], atol=1e-6)


def test_many_images_decode_in_slices_as_in_one_batch(pipe):
    out = draw(pipe, seed=3, num_samples_per_component=15)  # 6 means + 90 samples: two slices of DECODE_SLICE_SIZE
    assert len(out.images) == 96 > DECODE_SLICE_SIZE and not out.images.requires_grad
    store, decoder = pipe.latent_store, pipe.decoder.eval()
    latents, index = store.sample(torch.arange(6), 15, True, torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = decoder(latents, store.component_subtask[index]).clamp(0, 1)
    assert torch.allclose(out.images, whole, atol=1e-6)


def test_components_are_routed_to_their_subtasks_generator(pipe):
    with torch.no_grad():  # generator 1 (class 2) now outputs tanh(0) -> 0.5 everywhere
        pipe.decoder.generators[1].body[-2].weight.zero_()
        pipe.decoder.generators[1].body[-2].bias.zero_()
    out = draw(pipe)
    is_two = out.labels == 2
    assert torch.equal(out.images[is_two], torch.full_like(out.images[is_two], 0.5))
    assert all(img.std() > 1e-3 for img in out.images[~is_two])  # classes 0 and 1 still use generator 0
    # and each sample is exactly what its own generator makes of its latent
    out = pipe(class_labels=[0, 2], generator=torch.Generator().manual_seed(0), output_type="pt")
    latents, _ = pipe.latent_store.sample(torch.tensor([0, 1, 4, 5]), generator=torch.Generator().manual_seed(0))
    generators = pipe.decoder.eval().generators
    with torch.no_grad():
        direct = torch.cat([generators[0](latents[:2]), generators[1](latents[2:])]).add(1).div(2).clamp(0, 1)
    assert torch.allclose(out.images, direct, atol=1e-6)


def test_storage_counts_by_hand(pipe, tmp_path):
    # Decoder, per generator: Linear(8 -> 8*4*4) 8*128 + 128; ConvTranspose(8 -> 4, k4) 8*4*16 + 4;
    # BatchNorm(4) 4 + 4 parameters and 4 + 4 running stats + 1 batch counter; Conv3x3(4 -> 1) 4*9 + 1.
    per_generator = (8 * 128 + 128) + (8 * 4 * 16 + 4) + (4 + 4) + (4 + 4 + 1) + (4 * 9 + 1)
    assert per_generator == 1722
    per_generator_bytes = (per_generator - 1) * 4 + 8  # float32, the counter is int64
    # Latents: 3 classes x 2 components x 8 dims, mean and logvar. Labels: soft labels 6 x 3 (float32),
    # class and subtask id of each of the 6 components (int64).
    latent_values, label_values = 2 * 6 * 8, 6 * 3 + 6 + 6
    report = pipe.storage_report()
    assert report.decoder_values == 2 * per_generator == 3444
    assert report.latent_values == latent_values == 96
    assert report.label_values == label_values == 30
    assert report.total_values == 3570
    assert report.total_bytes == 2 * per_generator_bytes + latent_values * 4 + 6 * 3 * 4 + 2 * 6 * 8 == 14336
    assert report.values_per_image == 64 and report.num_classes == 3
    assert report.ipc_equivalent == pytest.approx(3570 / (3 * 64))
    assert report.to_dict()["total_values"] == 3570

    # What is counted is exactly what is saved: the tensors in the pipeline's safetensors files.
    pipe.save_pretrained(tmp_path)
    stored_values = stored_bytes = 0
    for file in tmp_path.glob("*/*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                stored_values += tensor.numel()
                stored_bytes += tensor.numel() * tensor.element_size()
    assert (stored_values, stored_bytes) == (report.total_values, report.total_bytes)
    # and the files' sizes, their headers aside: 8 bytes of header length, then the JSON header
    on_disk = sum(file.stat().st_size - 8 - int.from_bytes(file.read_bytes()[:8], "little")
                  for file in tmp_path.glob("*/*.safetensors"))
    assert on_disk == report.total_bytes
    assert report.latent_bytes + report.decoder_bytes + report.label_bytes == report.total_bytes
    assert (report.latent_bytes, report.label_bytes) == (latent_values * 4, 6 * 3 * 4 + 2 * 6 * 8)
    assert report.ipc_equivalent_bytes == pytest.approx(14336 / (3 * 64))  # against uint8 images of 64 bytes


def test_shared_log_variances_are_stored_once(tmp_path):
    # one log-variance per 4 dimensions: each of the 6 components stores 8 means and 2 log-variances
    store = GaussianLatentStore(class_ids=[0, 1, 2], num_classes=3, latents_per_class=2, latent_dim=8, logvar_dim=2,
                                subtask_sizes=[2, 1])
    pipe = D3Pipeline(latent_store=store, decoder=make_pipe().decoder)
    assert pipe.storage_report().latent_values == 6 * (8 + 2)
    pipe.save_pretrained(tmp_path)
    loaded = D3Pipeline.from_pretrained(tmp_path)
    assert loaded.latent_store.config.logvar_dim == 2
    assert torch.equal(draw(loaded, seed=1).images, draw(pipe, seed=1).images)


@pytest.mark.parametrize("store_settings, message", [
    ({"subtask_sizes": None}, "the store has 1 subtask"),
    ({"latent_dim": 6}, "latent_dim=6, the decoder 2 generator"),
])
def test_components_that_disagree_are_refused(store_settings, message):
    settings = {"class_ids": [0, 1, 2], "num_classes": 3, "latents_per_class": 2, "latent_dim": 8,
                "subtask_sizes": [2, 1], **store_settings}
    with pytest.raises(ValueError, match=f"the latent store and the decoder disagree: .*{message}"):
        D3Pipeline(latent_store=GaussianLatentStore(**settings), decoder=make_pipe().decoder)


def test_prototype_storage_by_hand():
    assert prototype_storage(10, 1, 784, soft_labels=True) == 10 * (784 + 10)
    assert prototype_storage(10, 5, 784, soft_labels=False) == 50 * 785


# ----------------------------------------------------------------------------------------------------------
# Loading a broken folder
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(pipe, tmp_path):
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("missing", ["model_index.json", "decoder/config.json", "latent_store/config.json"])
def test_missing_config_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(OSError, match=f"{saved} is not a D3Pipeline folder: {missing} is missing"):
        D3Pipeline.from_pretrained(saved)


def test_missing_weights_file(saved):
    (saved / "decoder" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError) as error:
        D3Pipeline.from_pretrained(saved)
    assert f"could not load a D3Pipeline from {saved}" in str(error.value)
    assert str(saved / "decoder") in str(error.value)


@pytest.mark.parametrize("component", ["decoder", "latent_store"])
def test_truncated_weights_file(saved, component):
    weights = saved / component / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError) as error:
        D3Pipeline.from_pretrained(saved)
    assert f"could not load a D3Pipeline from {saved}" in str(error.value)
    assert str(weights) in str(error.value)


def test_a_copied_folder_loads(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    assert torch.equal(draw(D3Pipeline.from_pretrained(copy)).images, draw(D3Pipeline.from_pretrained(saved)).images)


# ----------------------------------------------------------------------------------------------------------
# Loading through diffusers, and streaming samples
# ----------------------------------------------------------------------------------------------------------


def test_diffusion_pipeline_loads_a_saved_folder(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is D3Pipeline
    assert torch.equal(draw(loaded, seed=5).images, draw(pipe, seed=5).images)


def test_a_folder_of_another_pipeline_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = tmp_path / "model_index.json"
    index.write_text(index.read_text().replace('"D3Pipeline"', '"StableDiffusionPipeline"'))
    with pytest.raises(OSError, match="holds a 'StableDiffusionPipeline' pipeline, not a D3Pipeline"):
        D3Pipeline.from_pretrained(tmp_path)


def image_bytes(example: dict) -> bytes:
    return np.asarray(example["image"]).tobytes()


def take(stream, n: int) -> list[dict]:
    return [example for _, example in zip(range(n), stream)]


def test_stream_is_endless_and_deterministic_by_seed(pipe):
    components = pipe.latent_store.num_components  # 6: a pass is 12 images with the means
    first = take(pipe.to_iterable_dataset(seed=0), 5 * 2 * components)  # five passes: more than a dataset holds
    again = take(pipe.to_iterable_dataset(seed=0), 5 * 2 * components)
    other = take(pipe.to_iterable_dataset(seed=1), 5 * 2 * components)
    assert [image_bytes(e) for e in first] == [image_bytes(e) for e in again]
    assert [image_bytes(e) for e in first] != [image_bytes(e) for e in other]
    assert set(first[0]) == {"image", "label", "soft_label"} and isinstance(first[0]["image"], PIL.Image.Image)


def test_a_pass_is_every_mean_and_one_fresh_sample_of_every_component(pipe):
    store = pipe.latent_store
    first_pass = take(pipe.to_iterable_dataset(seed=0), 2 * store.num_components)
    means = draw(pipe, num_samples_per_component=0).images  # the decoded means, NCHW in [0, 1]
    mean_bytes = {np.asarray(pipe.numpy_to_pil(m.permute(1, 2, 0)[None].numpy())[0]).tobytes() for m in means}
    streamed_means = [e for e in first_pass if image_bytes(e) in mean_bytes]
    assert len(streamed_means) == store.num_components
    assert len({image_bytes(e) for e in first_pass}) == len(first_pass)
    assert sorted(e["label"] for e in first_pass) == sorted(store.component_class.tolist() * 2)
    for example in first_pass:  # each image carries its own component's soft label
        own = store.soft_labels[store.component_class == example["label"]]
        assert any(torch.allclose(torch.tensor(example["soft_label"]), s) for s in own)
    no_means = take(pipe.to_iterable_dataset(seed=0, include_means=False), 3 * store.num_components)
    assert not {image_bytes(e) for e in no_means} & mean_bytes
    assert sorted(e["label"] for e in no_means) == sorted(store.component_class.tolist() * 3)


def test_ranks_and_workers_read_disjoint_streams(pipe):
    from datasets.distributed import split_dataset_by_node
    from torch.utils.data import DataLoader

    stream = pipe.to_iterable_dataset(seed=0, include_means=False)
    n = 4 * pipe.latent_store.num_components  # four passes each
    ranks = [split_dataset_by_node(stream, rank, 2) for rank in range(2)]
    seen = [{image_bytes(e) for e in take(part, n)} for part in ranks]
    assert len(seen[0]) == len(seen[1]) == n and not seen[0] & seen[1]
    assert seen[0] == {image_bytes(e) for e in take(split_dataset_by_node(stream, 0, 2), n)}  # by seed alone

    loader = DataLoader(ranks[0].with_format("numpy"), batch_size=None, num_workers=2)
    from_workers = [np.asarray(e["image"]).tobytes() for e in take(loader, 2 * n)]
    assert len(set(from_workers)) == 2 * n and not set(from_workers) & seen[1]
    labels = [int(e["label"]) for e in take(DataLoader(ranks[0], batch_size=None, num_workers=2), 2 * n)]
    assert sorted(labels) == sorted(pipe.latent_store.component_class.tolist() * 8)  # every component, evenly


def test_stream_needs_a_shard(pipe):
    with pytest.raises(ValueError, match="num_shards=0 must be >= 1"):
        pipe.to_iterable_dataset(num_shards=0)


def test_sample_grid_names_a_row_per_class_at_a_readable_size(pipe):
    from hf_d3.sample_grid import sample_grid

    grid = sample_grid(pipe, per_class=5)
    assert grid.width >= 5 * 60 and 3 * 60 <= grid.height < 3 * 120  # 3 classes, each image drawn ~80 px
    assert sample_grid(pipe, per_class=5, max_classes=2).height < grid.height  # at most max_classes rows
    left = np.asarray(grid.convert("L"))[:, : grid.width // 10]  # the class names, left of the images
    assert (left < 100).any()
    assert sample_grid(make_pipe(out_channels=3), per_class=5).size == grid.size  # colour images too
