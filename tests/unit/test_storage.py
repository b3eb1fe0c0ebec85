"""The storage counter (hf_d3.storage): counted from the sizes alone, it equals what built modules hold, for every
decoder a D3Decoder can be."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_d3 import D3Decoder, GaussianLatentStore
from hf_d3.models.decoder import PRESETS
from hf_d3.quantization import STORAGE_DTYPES
from hf_d3.storage import storage_report

# (resolution, channels): one, two and three x2 stages, start sides 4, 4 and 7; odd and even widths
GEOMETRIES = [(8, [6, 4]), (16, [5, 8, 4]), (56, [3, 8, 4, 2])]
UPSAMPLING = [("transpose", 4), ("transpose", 3), ("nearest", 4), ("bilinear", 3)]
DECODERS = [
    {"resolution": r, "channels": c, "upsample_mode": mode, "upsample_kernel_size": kernel,
     "latent_projection": projection, "latent_dim": 12 if projection else c[0] * (r // 2 ** (len(c) - 1)) ** 2,
     "out_channels": out_channels, "num_subtasks": k}
    for (r, c), (mode, kernel), projection, out_channels, k in itertools.product(
        GEOMETRIES, UPSAMPLING, (True, False), (1, 3), (1, 3))
] + [D3Decoder.from_preset(name, resolution, 3, 2).config for name in PRESETS for resolution in (16, 28)]


def held(modules, tensors) -> tuple[int, int]:
    """The values and bytes of the tensors `tensors(module)` of `modules`."""
    found = [t for module in modules for t in tensors(module)]
    return sum(t.numel() for t in found), sum(t.numel() * t.element_size() for t in found)


@pytest.mark.parametrize("arguments", DECODERS, ids=lambda a: "-".join(str(a[k]) for k in (
    "resolution", "upsample_mode", "upsample_kernel_size", "latent_projection", "out_channels", "num_subtasks")))
def test_the_count_equals_the_tensors_of_the_built_modules(arguments):
    decoder = D3Decoder(**{k: v for k, v in arguments.items() if not k.startswith("_")})
    k, latent_dim = arguments["num_subtasks"], arguments["latent_dim"]
    logvar_dim = latent_dim // 4 if latent_dim % 4 == 0 else None  # shared log-variances, or one per value
    store = GaussianLatentStore(class_ids=[4, 0, 2, 5], num_classes=7, latents_per_class=3, latent_dim=latent_dim,
                                subtask_sizes=[2, 1, 1] if k == 3 else None, logvar_dim=logvar_dim)
    if k == 3:  # the integer buffers keep their 8 bytes in another float dtype
        store, decoder = store.double(), decoder.double()
    report = storage_report(store.config, decoder.config, store.dtype, decoder.dtype)
    everything = held([store, decoder], lambda m: [*m.parameters(), *m.buffers()])
    assert report.latent_values == held([store], lambda m: m.parameters())[0]
    assert report.label_values == held([store], lambda m: m.buffers())[0]
    assert report.decoder_values == held([decoder], lambda m: [*m.parameters(), *m.buffers()])[0]
    assert (report.total_values, report.total_bytes) == everything
    assert report.values_per_image == arguments["out_channels"] * arguments["resolution"] ** 2
    assert report.ipc_equivalent == everything[0] / (4 * report.values_per_image)
    assert storage_report(store.config, arguments, store.dtype, decoder.dtype) == report  # as the planner counts


def file_bytes(folder: Path) -> int:
    """The bytes of the tensors in a component folder's safetensors file, its header aside (8 bytes of header
    length, then the JSON header)."""
    file = folder / "diffusion_pytorch_model.safetensors"
    return file.stat().st_size - 8 - int.from_bytes(file.read_bytes()[:8], "little")


@pytest.mark.parametrize("storage_dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("arguments", DECODERS[::3], ids=lambda a: "-".join(str(a[k]) for k in (
    "resolution", "upsample_mode", "upsample_kernel_size", "latent_projection", "out_channels", "num_subtasks")))
def test_the_bytes_counted_are_the_bytes_saved_in_every_storage_dtype(arguments, storage_dtype, tmp_path):
    arguments = {k: v for k, v in arguments.items() if not k.startswith("_") and k != "storage_dtype"}
    decoder = D3Decoder(**arguments, storage_dtype=storage_dtype)
    store = GaussianLatentStore(class_ids=[4, 0, 2, 5], num_classes=7, latents_per_class=3,
                                latent_dim=arguments["latent_dim"], storage_dtype=storage_dtype,
                                subtask_sizes=[2, 1, 1] if arguments["num_subtasks"] == 3 else None)
    store.save_pretrained(tmp_path / "latent_store")
    decoder.save_pretrained(tmp_path / "decoder")
    report = storage_report(store.config, decoder.config)
    assert report.latent_bytes + report.label_bytes == file_bytes(tmp_path / "latent_store")
    assert report.decoder_bytes == file_bytes(tmp_path / "decoder")
    assert report == storage_report(store.config, {**arguments, "storage_dtype": storage_dtype})  # as planned
    with safe_open(str(tmp_path / "decoder" / "diffusion_pytorch_model.safetensors"), "pt") as saved:
        stored_dtypes = {saved.get_tensor(key).dtype for key in saved.keys()}
    assert stored_dtypes == {"float32": {torch.float32, torch.int64}, "float16": {torch.float16, torch.int64},
                             "bfloat16": {torch.bfloat16, torch.int64},
                             "int8": {torch.int8, torch.float32, torch.int64}}[storage_dtype]


def test_fewer_bits_store_fewer_bytes_and_the_same_values():
    decoder = D3Decoder.from_preset("small", 28, 1).config
    store = {"class_ids": list(range(10)), "num_classes": 10, "latents_per_class": 10, "latent_dim": 64}
    reports = {dtype: storage_report({**store, "storage_dtype": dtype}, {**decoder, "storage_dtype": dtype})
               for dtype in STORAGE_DTYPES}
    assert len({report.total_values for report in reports.values()}) == 1
    float32 = reports["float32"].total_bytes
    assert reports["float16"].total_bytes == reports["bfloat16"].total_bytes < 0.51 * float32
    assert 0.25 * float32 < reports["int8"].total_bytes < 0.27 * float32  # int8 values, their scales, the vectors


@pytest.mark.parametrize("decoder, store, message", [
    ({"latent_dim": 100}, {}, r"latent_dim=100 must equal channels\[0\] \* 7\*\*2 = 196"),
    ({"resolution": 30}, {}, "resolution=30 cannot be produced with 2 x2 upsampling stages"),
    ({"upsample_mode": "pixelshuffle"}, {}, "upsample_mode='pixelshuffle' is not valid"),
    ({}, {"logvar_dim": 3}, "logvar_dim=3 must divide latent_dim=196"),
])
def test_sizes_no_module_can_have_are_refused(decoder, store, message):
    decoder = {"latent_dim": 196, "resolution": 28, "out_channels": 1, "channels": [4, 8, 8],
               "latent_projection": False, "upsample_kernel_size": 4, "upsample_mode": "nearest", "num_subtasks": 1,
               **decoder}
    store = {"class_ids": [0, 1], "num_classes": 2, "latents_per_class": 1, "latent_dim": 196, **store}
    with pytest.raises(ValueError, match=message):
        storage_report(store, decoder)


def test_float32_saves_the_modules_tensors_as_they_are(tmp_path):
    from safetensors.torch import save_file

    store = GaussianLatentStore(class_ids=[0, 1, 2], num_classes=3, latents_per_class=2, latent_dim=8)
    store.save_pretrained(tmp_path / "store")
    save_file(store.state_dict(), tmp_path / "plain.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "store" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tmp_path / "plain.safetensors").read_bytes()


@pytest.mark.parametrize("storage_dtype", STORAGE_DTYPES)
def test_a_store_of_top_k_labels_keeps_k_probabilities_saves_k_values_and_ids_and_counts_their_bytes(
        storage_dtype, tmp_path):
    store = GaussianLatentStore(class_ids=[4, 0, 2, 5], num_classes=7, latents_per_class=3, latent_dim=16,
                                storage_dtype=storage_dtype, label_top_k=2)
    labels = torch.rand(12, 7).softmax(1)
    store.set_soft_labels(labels)
    kept = labels.topk(2, dim=1)
    assert (store.soft_labels > 0).sum(1).tolist() == [2] * 12  # the two largest, renormalised
    assert torch.allclose(store.soft_labels.gather(1, kept.indices), kept.values / kept.values.sum(1, keepdim=True))

    store.save_pretrained(tmp_path / "store")
    with safe_open(str(tmp_path / "store" / "diffusion_pytorch_model.safetensors"), "pt") as saved:
        assert "soft_labels" not in saved.keys()
        assert saved.get_tensor("soft_label_ids").dtype == torch.int16
        assert saved.get_tensor("soft_label_ids").shape == saved.get_tensor("soft_label_values").shape == (12, 2)
    report = storage_report(store.config, D3Decoder.from_preset("small", 28, 1).config)
    assert report.latent_bytes + report.label_bytes == file_bytes(tmp_path / "store")
    assert report.label_values == 12 * (2 + 2 + 2)  # k probabilities, k class ids, the class and subtask ids
    loaded = GaussianLatentStore.from_pretrained(tmp_path / "store")
    assert loaded.config.label_top_k == 2
    assert torch.allclose(loaded.soft_labels, store.soft_labels, atol=1 / 254)  # int8: per component, of its largest
    assert torch.equal(loaded.soft_labels > 0, store.soft_labels > 0)


def test_top_k_must_be_at_most_the_classes():
    with pytest.raises(ValueError, match=r"label_top_k=8 must be None \(whole labels\) or 1 to num_classes=7"):
        GaussianLatentStore(class_ids=[0], num_classes=7, label_top_k=8)
