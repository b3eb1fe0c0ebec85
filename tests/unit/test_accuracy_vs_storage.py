"""The curve benchmark's bookkeeping: which saved rows answer for today's settings (a D3 row's run reuses its stages
by key: tests/integration/test_run.py).
(The rows themselves come from library functions tested elsewhere; the whole script is run by hand: BENCHMARKS.md.)"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.modeling_outputs import ImageClassifierOutput

from hf_d3.config import D3Config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy_vs_storage.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accuracy_vs_storage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def settings():
    return {**D3Config().to_dict(), "seeds": 3, "num_threads": 1, "hard_label_weight": 1.0}


def test_a_row_saved_before_a_setting_existed_counts_at_the_value_it_was_computed_with(bench, settings):
    old = {k: v for k, v in settings.items() if k != "hard_label_weight"}  # rows before the label rule used 0
    assert not bench.same_settings(old, settings)
    assert bench.same_settings(old, {**settings, "hard_label_weight": 0.0})
    assert bench.same_settings({**settings, "output_dir": "elsewhere", "log_every": 1}, settings)  # bookkeeping
    assert bench.same_settings({**settings, "dataset": "/elsewhere/tiny-imagenet-200"}, settings)  # a key names it
    assert not bench.same_settings({**settings, "iterations": 61}, settings)


def test_real_images_with_class_ids_ignore_the_label_weight(bench, settings):
    r_h = bench.row_settings("R+H", settings)
    assert "hard_label_weight" not in r_h and bench.row_settings("D3", settings)["hard_label_weight"] == 1.0
    assert bench.same_settings(bench.row_settings("R+H", {**settings, "hard_label_weight": 0.0}), r_h)


def test_random_real_rows_outlive_a_change_of_the_distillation_settings(bench, settings):
    changed = {**settings, "syn_batch_size": 128, "init_steps": 5, "decoder_max_width": 8}
    for method in ("R+H", "R+S", "R+S-low"):
        assert bench.same_settings(bench.row_settings(method, settings), bench.row_settings(method, changed))
    assert not bench.same_settings(bench.row_settings("R+S", settings), {**changed, "eval_steps": 7})
    for method in ("D3", "prototypes"):
        assert not bench.same_settings(bench.row_settings(method, settings), bench.row_settings(method, changed))


def test_soft_label_baselines_choose_between_teacher_labels_and_d3s_mix(bench, settings):
    assert bench.baseline_label_weights(0.4) == [0.0, 0.4] and bench.baseline_label_weights(0.0) == [0.0]
    for method in ("R+S", "prototypes"):
        chosen = bench.row_settings(method, settings)
        assert chosen["baseline_label_weights"] == [0.0, 1.0]
        assert not bench.same_settings(settings, chosen)  # a row saved before the choice was made is redone


def test_prototypes_are_labelled_by_the_teacher_with_the_class_mixed_in(bench):
    class Teacher(torch.nn.Module):  # a fixed linear teacher: its softmax is known in closed form
        def forward(self, pixel_values):
            return ImageClassifierOutput(logits=torch.stack([pixel_values.flatten(1).sum(1),
                                                             torch.zeros(len(pixel_values))], 1))

    prototypes = torch.rand(4, 1, 2, 2)
    sampler = bench.prototype_sampler(D3Config(), prototypes, Teacher(), 2, 0.25, temperature=0.5)
    images, labels = sampler(None)
    classes = torch.tensor([0, 0, 1, 1])
    teacher = torch.softmax(torch.stack([prototypes.flatten(1).sum(1), torch.zeros(4)], 1) / 0.5, 1)
    expected = 0.25 * torch.nn.functional.one_hot(classes, 2) + 0.75 * teacher
    assert images is prototypes and torch.allclose(labels, expected)


def test_every_soft_label_method_chooses_its_temperature_and_an_earlier_grid_lends_its_scores(bench, settings,
                                                                                            tmp_path):
    for method in ("D3", "D3-hand", "prototypes", "R+S", "R+S-low"):
        assert bench.row_settings(method, settings)["label_temperatures"] == list(bench.TEMPERATURES)
    assert "label_temperatures" not in bench.row_settings("R+H", settings)
    assert bench.row_settings("R+S", settings, [0.5, 0.125])["label_temperatures"] == [0.125, 0.5]  # --temperatures
    assert min(bench.TEMPERATURES) < bench.FIRST_TEMPERATURE  # the first grid's edge is inside the grid now

    # a row saved before the grid grew is not done, but it is an earlier row of the same settings...
    key = {"dataset": "fashion_mnist", "budget": "2", "unit": "values", "storage_dtype": "float32",
           "label_top_k": None}
    old = {"accuracies": [0.5, 0.6], "hard_label_weight": 0.0, "held_out_accuracy": {"0.0": 0.41}}
    chosen = bench.row_settings("prototypes", settings)
    before = {k: v for k, v in chosen.items() if k != "label_temperatures"}
    (tmp_path / "row_prototypes.json").write_text(json.dumps({**key, "settings": before, "row": old}))
    assert not bench.is_done(tmp_path, "prototypes", chosen)
    assert bench.earlier_row(tmp_path, "prototypes", chosen) == old
    assert bench.earlier_row(tmp_path, "prototypes", {**chosen, "eval_steps": 7}) is None  # ...of other settings not
    # ...whose accuracies stand where the new choice is the one it made (the prototypes' before they chose a
    # temperature: the first)
    assert bench.carried_accuracies(old, {"hard_label_weight": 0.0, "temperature": 1.0}) == [0.5, 0.6]
    assert bench.carried_accuracies(old, {"hard_label_weight": 0.0, "temperature": 0.5}) is None
    assert bench.carried_accuracies(None, {"hard_label_weight": 0.0, "temperature": 1.0}) is None


def test_d3_is_scored_at_every_temperature_as_its_run_relabels_it(bench, tmp_path):
    from conftest import make_net, make_store_and_decoder

    from hf_d3 import D3Pipeline

    store, decoder = make_store_and_decoder()
    run = tmp_path / "d3"
    D3Pipeline(latent_store=store, decoder=decoder).save_pretrained(run / "pipeline")
    (run / "config.json").write_text(json.dumps({"hard_label_weight": 0.0, "storage_dtype": "float32"}))
    teacher = make_net()
    labels_seen = {}

    def score(sampler):  # the labels a student would see, by their sharpness: each temperature its own
        _, soft = sampler(torch.Generator().manual_seed(0))
        sharpness = soft.max(1).values.mean().item()
        labels_seen[sharpness] = soft
        return sharpness

    grid = list(bench.TEMPERATURES)
    held_out = bench.KeptScores(tmp_path, lambda: score, lambda method: {"eval_steps": 7, "output_dir": "here",
                                                                         "label_temperatures": grid})
    scores = bench.d3_held_out_scores("D3", run, teacher, held_out, known={"8.0": 0.0})
    assert list(scores) == [str(t) for t in bench.TEMPERATURES]
    assert scores["8.0"] == 0.0 and len(labels_seen) == len(bench.TEMPERATURES) - 1  # the known one not measured
    assert scores["0.25"] > scores["1.0"] > scores["4.0"]  # a lower temperature, sharper labels
    pipe = D3Pipeline.from_pretrained(run / "pipeline")
    means = pipe.decoder(pipe.latent_store.mean, pipe.latent_store.component_subtask)
    expected = bench.teacher_labels(teacher, means, 1.0)
    assert torch.allclose(labels_seen[scores["1.0"]][: len(expected)], expected, atol=1e-6)  # the means come first

    # every score was kept as it was measured: a rerun (a killed run's, or one where another output folder is
    # bookkeeping) measures none again; other settings measure anew
    again = bench.KeptScores(tmp_path, lambda: pytest.fail("measured again"),
                             lambda method: {"eval_steps": 7, "label_temperatures": grid})
    assert bench.d3_held_out_scores("D3", run, teacher, again, known={"8.0": 0.0}) == scores
    measured = []
    other = bench.KeptScores(tmp_path, lambda: lambda sampler: measured.append(sampler) or 0.5,
                             lambda method: {"eval_steps": 8, "label_temperatures": grid})
    bench.d3_held_out_scores("D3", run, teacher, other, known={})
    assert len(measured) == len(bench.TEMPERATURES)
    # the grid is the row's: another grid scores its own temperatures, measuring only those no score is known at
    measured.clear()
    narrow = bench.KeptScores(tmp_path, lambda: lambda sampler: measured.append(sampler) or 0.5,
                              lambda method: {"eval_steps": 9, "label_temperatures": [0.125, 0.25]})
    assert list(bench.d3_held_out_scores("D3", run, teacher, narrow, known={"0.25": 0.1})) == ["0.125", "0.25"]
    assert len(measured) == 1


def test_the_real_image_rows_in_a_new_folder_and_beside_an_earlier_grid(bench, fmnist4_tensors, tmp_path):
    from conftest import TINY_RUN, make_net

    from hf_d3.data import RealImages

    config = D3Config.from_dict({**TINY_RUN, "dataset": "unused", "hard_label_weight": 0.5})
    test = RealImages(fmnist4_tensors.images[:8], fmnist4_tensors.labels[:8], fmnist4_tensors.class_names)
    budget = bench.Budget(2, "values", "float32", 4, 256)
    settings = {"eval_steps": 4, "label_temperatures": list(bench.TEMPERATURES)}
    measured = []
    held_out = bench.KeptScores(tmp_path, lambda: lambda sampler: measured.append(sampler) or 0.1 * len(measured),
                                lambda method: settings)
    methods = ["R+H", "R+S", "R+S-low"]
    rows = bench.real_rows(config, fmnist4_tensors, test, make_net(), budget, 1, methods, held_out,
                           earlier=dict.fromkeys(methods))  # no method has an earlier row
    grid = len(bench.TEMPERATURES)
    assert len(measured) == 2 * grid + 2 * grid  # R+S: 2 weights; R+S-low: factors 2 and 4 (1 is R+S's)
    assert rows["R+S"]["temperature"] in bench.TEMPERATURES and rows["R+H"]["temperature"] is None
    # an earlier row whose choice stands lends its accuracies; its held-out scores spare every measurement
    earlier = {m: {**rows[m], "accuracies": [0.99]} for m in methods}
    again = bench.real_rows(config, fmnist4_tensors, test, make_net(), budget, 1, methods,
                            bench.KeptScores(tmp_path / "elsewhere", lambda: pytest.fail("measured"),
                                             lambda method: settings), earlier=earlier)
    assert again["R+S"]["accuracies"] == again["R+S-low"]["accuracies"] == [0.99]
    assert again["R+H"]["accuracies"] == [0.99]


def test_rows_within_2_std_of_another_get_more_seeds(bench):
    rows = {"D3": {"accuracies": [0.70, 0.72, 0.71]}, "R+S": {"accuracies": [0.715, 0.705, 0.725]},
            "R+H": {"accuracies": [0.50, 0.51, 0.49]}}
    assert bench.close_methods(rows) == {"D3", "R+S"}


def test_records_name_local_datasets_relative_to_the_repository(bench):
    local = bench.ROOT.parent / "shared/data/tiny-imagenet-200"
    assert bench.portable(str(local)) == "../shared/data/tiny-imagenet-200"
    assert bench.portable("fashion_mnist") == "fashion_mnist"


def test_a_budget_in_bytes_gives_uint8_images_about_four_times_the_room(bench):
    # 10 classes of 784-value images at 2 IPC-equivalent: 15,680 values, or bytes
    values = bench.Budget(2, "values", "float32", 10, 784)
    assert values.images_within(soft=False) == (1, False)  # 2 x 785 values per class do not fit twice
    assert values.images_within(soft=True, downsample=2) == (7, False)  # 196 + 10 values each: 7 per class
    in_bytes = bench.Budget(2, "bytes", "int8", 10, 784)
    assert in_bytes.images_within(soft=False) == (1, False)  # 784 + 8 bytes each
    assert in_bytes.images_within(soft=True, downsample=2) == (7, False)  # 196 + 10 + 4 bytes each
    one = in_bytes.cost(1, soft=True)
    assert one["bytes"] == 10 * (784 + 14) and one["values"] == 10 * 794
    assert one["ipc_equivalent_bytes"] == 798 / 784 and one["ipc_equivalent"] == 794 / 784
    assert bench.Budget(0.5, "values", "float32", 10, 784).images_within(soft=True) == (1, True)  # over budget
    assert values.folder_name == "ipc2" and in_bytes.folder_name == "bytes2-int8"


def test_with_top_k_labels_the_baselines_labels_cost_k_values_and_k_ids(bench):
    # 200 classes of 32x32x3 images at 2 IPC-equivalent: whole soft labels cost 200 values an image, top-10 ones 20
    whole, top_10 = (bench.Budget(2, "values", "float32", 200, 3072, k) for k in (None, 10))
    assert whole.images_within(soft=True, downsample=2) == (6, False)  # 768 + 200 values each
    assert top_10.images_within(soft=True, downsample=2) == (7, False)  # 768 + 20
    assert top_10.cost(1, soft=True)["values"] == 200 * (3072 + 20)
    in_bytes = bench.Budget(2, "bytes", "int8", 200, 3072, 10)
    assert in_bytes.cost(1, soft=True)["bytes"] == 200 * (3072 + 10 + 4 + 10 * 2)  # int8 values, a scale, int16 ids
    assert top_10.folder_name == "ipc2-top10" and in_bytes.folder_name == "bytes2-int8-top10"


def test_the_figure_draws_the_latest_record_of_each_panel_budget_and_method(bench, tmp_path):
    def record(date, accuracy, **settings):
        return {"benchmark": "accuracy_vs_storage", "command": "c", "commit": "x", "date": date, "machine": "m",
                "settings": {"dataset": "tiny_imagenet", "budget_ipc": 2.0, "method": "D3", "config": {}, **settings},
                "figures": {"accuracies": [accuracy]}}

    path = tmp_path / "accuracy_vs_storage.json"
    path.write_text(json.dumps([
        record("2026-12-07", 0.03), record("2026-12-06", 0.01),  # an older date written later: not the latest
        record("2026-12-07", 0.05, unit="bytes", storage_dtype="int8"),  # another panel
        record("2026-12-07", 0.02, method="R+S"), record("2026-12-07", 0.09, variant="probe")]))
    panels = bench.panels_from_records(path)
    values, in_bytes = (panels[("tiny_imagenet", "values", "float32", None)],
                        panels[("tiny_imagenet", "bytes", "int8", None)])
    assert set(panels) == {("tiny_imagenet", "values", "float32", None), ("tiny_imagenet", "bytes", "int8", None)}
    assert {m: row["accuracies"] for m, row in values["2"].items()} == {"D3": [0.03], "R+S": [0.02]}
    assert in_bytes["2"]["D3"]["accuracies"] == [0.05]


def test_the_caption_names_each_budget_where_a_baseline_reaches_d3(bench):
    def rows(**means):
        return {method: {"accuracies": [mean - 0.01, mean + 0.01], "over_budget": method == "R+H"}
                for method, mean in means.items()}

    panels = {("cifar10", "bytes", "int8", None): {"1": rows(D3=0.30, **{"R+S": 0.20}),
                                             "10": rows(D3=0.40, **{"R+S": 0.41, "R+H": 0.40, "prototypes": 0.39})},
              ("fashion_mnist", "values", "float32", None): {"2": rows(D3=0.70, prototypes=0.69)}}
    assert bench.caption(panels) == ("Where D3 is not worth it: a baseline's mean test accuracy is at or above D3's "
                                     "at these budgets (IPC-equivalents): CIFAR-10 subset (5,085 train / 1,017 test) "
                                     "in bytes, D3 in int8: at 10 (R+H*, R+S) (*: over the budget, as one image a "
                                     "class with its label does not fit).")
    del panels[("cifar10", "bytes", "int8", None)]
    assert bench.caption(panels) == "D3's mean is above every baseline's at every budget measured."


def test_a_fresh_clone_restores_the_baselines_rows_from_their_committed_records(bench, settings, tmp_path):
    key = {"dataset": "fashion_mnist", "budget": "2", "unit": "values", "storage_dtype": "float32",
           "label_top_k": None, "settings": settings}

    def settings_of(method):
        return bench.row_settings(method, settings)

    def record(method, config=None):
        method_key = {**key, "settings": config or settings_of(method)}
        return {"benchmark": "accuracy_vs_storage", "command": "python benchmarks/accuracy_vs_storage.py",
                "commit": "0" * 40, "date": "2026-12-07", "machine": "amd-epyc-2c",
                "settings": bench.record_settings(method, method_key), "figures": {"accuracies": [0.5], "of": method}}

    stale = {**settings_of("R+S"), "eval_steps": 7}
    earlier_grid = {**settings_of("prototypes"), "label_temperatures": [1.0, 2.0]}
    results = tmp_path / "accuracy_vs_storage.json"
    results.write_text(json.dumps([record("R+H"), record("R+S", stale), record("D3"), record("R+S-low"),
                                   record("prototypes", earlier_grid)]))
    folder = tmp_path / "ipc2"
    folder.mkdir()
    (folder / "row_R+S-low.json").write_text(json.dumps({**key, "method": "R+S-low", "row": {"of": "this machine"}}))

    assert bench.restore_rows(folder, key, settings_of, results) == ["prototypes", "R+H"]
    assert bench.is_done(folder, "R+H", settings_of("R+H"))
    assert bench.saved_row(folder, "R+H")["row"] == {"accuracies": [0.5], "of": "R+H"}
    assert not bench.is_done(folder, "R+S", settings_of("R+S"))  # its record has other settings
    assert bench.saved_row(folder, "D3") is None  # a top-up of D3's students needs its run's pipeline
    assert bench.saved_row(folder, "R+S-low")["row"] == {"of": "this machine"}
    # a row of an earlier grid of temperatures is not done, but lends its scores
    assert not bench.is_done(folder, "prototypes", settings_of("prototypes"))
    assert bench.earlier_row(folder, "prototypes", settings_of("prototypes")) == {"accuracies": [0.5],
                                                                                  "of": "prototypes"}


def test_a_temperature_not_above_zero_is_refused_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--temperatures", "0.5", "0",
                             "-1"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--temperatures 0 -1: a temperature must be above 0" in result.stderr
    assert not any(tmp_path.iterdir())
