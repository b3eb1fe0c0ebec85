"""Any transformers image classifier as a student (`hf_d3.student_training`, `recipes/train_student.py`): trained
with `transformers.Trainer` on soft labels, from a streamed pipeline or a Parquet dataset, scored on the real test
split. The students are tiny models built from configs (nothing is downloaded) or hf_d3's own ConvNet; the recipe runs
as a real process, and so does the snippet of docs/using.md (the data it pulls comes from the local test Hub)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from conftest import FMNIST4_CLASSES, TINY_RUN, write_parquet_dataset
from snippets import shell_commands
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)

from hf_d3 import ConvNetForImageClassification, D3Pipeline, build_classifier
from hf_d3.config import D3Config
from hf_d3.data import load_test_images
from hf_d3.run import run_distillation
from hf_d3.student_protocol import LR_DECAY, WEIGHT_DECAY, student_optimizer
from hf_d3.student_training import (
    DistilledCollator,
    PixelFormat,
    SoftLabelTrainer,
    StudentTrainingConfig,
    load_distilled,
    run_student_training,
)

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "recipes" / "train_student.py"
# Latents fitted to real images, a better teacher and a lower temperature than TINY_RUN's: confident soft labels of the
# right classes (TINY_RUN's are within 0.03 nats of log 4, mostly of one class), so students learn in a few steps.
RUN = {**TINY_RUN, "init": "real", "init_steps": 50, "init_lr": 0.01, "teacher_epochs": 10, "relabel_temperature": 0.25}
STUDENT = {"eval_steps": 20, "eval_batch_size": 16, "eval_lr": 0.05, "eval_augment": False}
NUM_TEST = TINY_RUN["max_test_examples"]
# 3 channels at 20 x 20: the 16 x 16 grayscale images are repeated to RGB and resized.
VIT = {"image_size": 20, "patch_size": 5, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
       "intermediate_size": 32}
# Grayscale, no image_size (it takes the distilled 16 x 16), 10 labels: its head is resized to the 4 classes.
RESNET = {"num_channels": 1, "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic",
          "num_labels": 10}


@pytest.fixture(scope="module")
def run_dir(fmnist4_folder, tmp_path_factory) -> Path:
    """A real tiny distillation on the 4 Fashion-MNIST classes: `<run_dir>/pipeline` (8 Gaussians, 16 x 16)."""
    output_dir = tmp_path_factory.mktemp("run")
    run_distillation(D3Config.from_dict({"dataset": str(fmnist4_folder), **RUN, "output_dir": str(output_dir)}))
    return output_dir


def config_of(fmnist4_folder: Path, run_dir: Path) -> D3Config:
    return D3Config.from_dict({"dataset": str(fmnist4_folder), **RUN, "output_dir": str(run_dir), **STUDENT})


def predict(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=pixel_values).logits.argmax(1)


def check_trained(metrics: dict, initial: dict[str, torch.Tensor], trained: torch.nn.Module, steps: int) -> None:
    """The Trainer ran every step, the loss fell and the weights moved."""
    assert metrics["steps"] == steps and [step for step, _ in metrics["loss_history"]] == list(range(1, steps + 1))
    losses = [loss for _, loss in metrics["loss_history"]]
    assert np.mean(losses[-5:]) < losses[0] - 0.05, losses
    moved = [name for name, value in trained.state_dict().items()
             if value.is_floating_point() and not torch.equal(value, initial[name])]
    assert len(moved) >= 0.8 * sum(v.is_floating_point() for v in initial.values()), moved


def test_a_vit_built_from_a_config_trains_on_the_streamed_pipeline(fmnist4_folder, run_dir, tmp_path):
    ViTConfig(**VIT).to_json_file(tmp_path / "vit.json")
    config = config_of(fmnist4_folder, run_dir)
    set_seed(config.run.seed)  # the student's initial weights, as run_student_training draws them
    initial = AutoModelForImageClassification.from_config(
        AutoConfig.from_pretrained(tmp_path / "vit.json", num_labels=4)).state_dict()

    # distilled and student_output_dir unset: the run's pipeline, written to <output_dir>/student
    result = run_student_training(config, StudentTrainingConfig(student_model=str(tmp_path / "vit.json")))

    metrics = json.loads((run_dir / "student" / "metrics.json").read_text())
    stream = load_distilled(str(run_dir / "pipeline"), seed=config.run.seed).train  # what the student read
    assert {example["label"] for example in itertools.islice(stream, 16)} == {0, 1, 2, 3}
    assert metrics == json.loads(json.dumps(dataclasses.asdict(result)))
    assert metrics["distilled"] == str(run_dir / "pipeline") and metrics["distilled_kind"] == "pipeline"
    assert metrics["model_type"] == "vit" and metrics["num_test_examples"] == NUM_TEST
    assert metrics["pixel_format"] == {"channels": 3, "size": [20, 20], "mean": [0.5] * 3, "std": [0.5] * 3}
    student = AutoModelForImageClassification.from_pretrained(run_dir / "student")
    assert isinstance(student, ViTForImageClassification)
    assert student.config.id2label == dict(enumerate(FMNIST4_CLASSES))
    check_trained(metrics, initial, student, steps=20)
    # The accuracy is that of the saved model on the real test split, the images prepared by hand.
    test = load_test_images(config.data)
    rgb = torch.nn.functional.interpolate(test.images[:].repeat(1, 3, 1, 1), size=(20, 20), mode="bilinear",
                                          antialias=True).clamp(0, 1)
    assert len(test.labels) == NUM_TEST and 0 <= metrics["accuracy"] <= 1
    assert metrics["accuracy"] == (predict(student, (rgb - 0.5) / 0.5) == test.labels).sum().item() / NUM_TEST


def test_a_checkpoint_trains_on_a_parquet_dataset(fmnist4_folder, run_dir, tmp_path):
    pipe = D3Pipeline.from_pretrained(run_dir / "pipeline")
    data = write_parquet_dataset(tmp_path / "data", {"train": pipe.to_dataset(num_samples_per_component=3, seed=1)})
    checkpoint = tmp_path / "resnet"
    ResNetForImageClassification(ResNetConfig(**RESNET)).save_pretrained(checkpoint)
    processor = {"image_processor_type": "ViTImageProcessor", "image_mean": [0.25], "image_std": [0.4]}
    (checkpoint / "preprocessor_config.json").write_text(json.dumps(processor))
    config = config_of(fmnist4_folder, run_dir)
    set_seed(config.run.seed)
    initial = AutoModelForImageClassification.from_pretrained(
        checkpoint, num_labels=4, ignore_mismatched_sizes=True).state_dict()
    output_dir = tmp_path / "student"

    run_student_training(config, StudentTrainingConfig(student_model=str(checkpoint), distilled=str(data),
                                                       student_output_dir=str(output_dir)))

    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["distilled_kind"] == "dataset" and metrics["num_test_examples"] == NUM_TEST
    assert metrics["pixel_format"] == {"channels": 1, "size": [16, 16], "mean": [0.25], "std": [0.4]}
    assert json.loads((output_dir / "preprocessor_config.json").read_text()) == processor
    student = AutoModelForImageClassification.from_pretrained(output_dir)
    assert isinstance(student, ResNetForImageClassification) and student.config.num_labels == 4
    check_trained(metrics, initial, student, steps=20)
    test = load_test_images(config.data)
    predictions = predict(student, (test.images[:] - 0.25) / 0.4)  # read from the cache
    assert len(predictions.unique()) > 1  # a student that learnt something: the accuracy depends on the inputs
    assert metrics["accuracy"] == (predictions == test.labels).sum().item() / NUM_TEST


def test_the_loss_is_the_soft_cross_entropy_of_the_batch(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("convnet", 1, 16, 4, width=8, depth=2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = SoftLabelTrainer(model=model, args=args, pixel_format=PixelFormat(1, (16, 16), (0.0,), (1.0,)))
    images, targets = torch.rand(5, 1, 16, 16), torch.rand(5, 4).softmax(1)

    loss = trainer.compute_loss(model, {"pixel_values": images, "soft_labels": targets})

    logits = model(pixel_values=images).logits.double()
    by_hand = sum(-sum(targets[i, c].item() * (logits[i, c] - logits[i].exp().sum().log()).item() for c in range(4))
                  for i in range(5)) / 5
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    # num_items_in_batch (a token count for language models) does not rescale a per-image mean.
    assert trainer.compute_loss(model, {"pixel_values": images, "soft_labels": targets},
                                num_items_in_batch=3).item() == pytest.approx(by_hand, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_the_trainer_steps_with_the_student_protocols_optimiser_and_schedule(tmp_path):
    model = build_classifier("convnet", 1, 16, 4, width=8, depth=2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=0.05,
                             weight_decay=WEIGHT_DECAY)
    trainer = SoftLabelTrainer(model=model, args=args, pixel_format=PixelFormat(1, (16, 16), (0.0,), (1.0,)))

    trainer.create_optimizer_and_scheduler(num_training_steps=8)

    assert type(trainer.optimizer) is torch.optim.SGD  # not the Trainer's AdamW
    assert trainer.optimizer.defaults == student_optimizer(model.parameters(), 0.05).defaults  # what train_student uses
    lrs = []
    for _ in range(8):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs == pytest.approx([0.05] * 4 + [0.05 * LR_DECAY] * 4)  # decayed once, at half-time


def test_images_become_the_students_pixel_values():
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    batch = DistilledCollator(1)([{"image": PIL.Image.fromarray(gray), "soft_label": [0.25, 0.75]}] * 2)
    assert batch["pixel_values"].shape == (2, 1, 4, 4) and batch["soft_labels"].tolist() == [[0.25, 0.75]] * 2
    assert torch.equal(batch["pixel_values"][0, 0], torch.from_numpy(gray).float() / 255)

    rgb = PixelFormat(3, (8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(batch["pixel_values"])
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert rgb.mean().item() == pytest.approx((batch["pixel_values"].mean().item() - 0.5) / 0.25, abs=1e-5)
    colour = torch.rand(2, 3, 4, 4)
    luma = PixelFormat(1, (4, 4), (0.0,), (1.0,))(colour)
    assert torch.allclose(luma[:, 0], 0.299 * colour[:, 0] + 0.587 * colour[:, 1] + 0.114 * colour[:, 2])


def test_the_recipe_trains_the_runs_own_student(fmnist4_folder, run_dir, tmp_path):
    settings = {"dataset": str(fmnist4_folder), **RUN, "output_dir": str(tmp_path / "run"), "eval_steps": 4,
                "student_output_dir": str(tmp_path / "convnet")}  # the recipe's own keys sit beside the run's
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))

    done = subprocess.run([sys.executable, str(RECIPE), "--config", str(tmp_path / "run.yaml"), "--distilled",
                           str(run_dir / "pipeline"), "--eval_steps", "3"], capture_output=True, text=True,
                          timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    assert f"on {NUM_TEST} real test images" in done.stdout
    metrics = json.loads((tmp_path / "convnet" / "metrics.json").read_text())
    assert metrics["steps"] == metrics["settings"]["eval_steps"] == 3  # the command line wins over the file
    assert metrics["settings"]["eval_augment"] is True  # the run's protocol: DSA augmentation
    assert metrics["model_type"] == "d3_convnet" and metrics["pixel_format"]["mean"] == [0.0]
    student = AutoModelForImageClassification.from_pretrained(tmp_path / "convnet")
    assert isinstance(student, ConvNetForImageClassification)
    assert (student.config.width, student.config.depth) == (RUN["net_width"], RUN["net_depth"])
    assert not (tmp_path / "run" / "student").exists()


def test_a_bad_distilled_value_says_what_is_valid(fmnist4_folder, local_hub, new_repo_id, tmp_path):
    with pytest.raises(ValueError, match="not those of a D3 dataset: it needs `image` .* and `soft_label`"):
        load_distilled(str(fmnist4_folder))  # a real dataset: no soft labels
    with pytest.raises(ValueError, match="neither a local folder nor a Hub repo id"):
        load_distilled(str(tmp_path / "missing" / "pipeline"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a D3 pipeline .*model_index.json.* nor a dataset"):
        load_distilled(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"(?s)neither a D3 pipeline repo \(404.* nor a Hub dataset \(Dataset"):
        load_distilled(new_repo_id("nothing-here"))  # a Hub id with no repo behind it


def test_the_documented_snippet_runs(run_dir, local_hub, new_repo_id, tmp_path):
    # The layout a finished run leaves when launched from the working directory, and its data published on the Hub.
    run = tmp_path / "outputs" / "fashion_mnist"
    shutil.copytree(run_dir / "pipeline", run / "pipeline")
    settings = json.loads((run_dir / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**settings, "output_dir": "outputs/fashion_mnist"}))
    repo_id = new_repo_id("fashion-mnist-d3-data")
    D3Pipeline.from_pretrained(run / "pipeline").to_dataset(seed=0).push_to_hub(repo_id, config_name="ipc10")

    commands = shell_commands("train_student")
    assert len(commands) == 3
    for command in commands:
        args = [{"python": sys.executable, "recipes/train_student.py": str(RECIPE),
                 "user/fashion-mnist-d3-data": repo_id}.get(arg, arg) for arg in command]
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"

    own = json.loads((run / "student" / "metrics.json").read_text())
    assert own["model_type"] == "d3_convnet" and own["distilled_kind"] == "pipeline"
    assert own["distilled"] == "outputs/fashion_mnist/pipeline" and own["steps"] == RUN["eval_steps"]
    vit = json.loads((run / "vit" / "metrics.json").read_text())
    assert vit["model_type"] == "vit" and vit["distilled_kind"] == "dataset" and vit["distilled"] == repo_id
    assert vit["num_test_examples"] == own["num_test_examples"] == NUM_TEST
    assert isinstance(AutoModelForImageClassification.from_pretrained(run / "vit"), ViTForImageClassification)
