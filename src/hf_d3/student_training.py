"""Train any transformers image classifier on a distilled dataset with `transformers.Trainer` and soft labels.

The student is an `AutoModelForImageClassification`: the run's own ConvNet / ResNet18_AP, a checkpoint (a folder or Hub
id; its head is resized to the distilled classes) or a fresh model built from a `config.json`. It trains on a D3
pipeline, streamed (`D3Pipeline.to_iterable_dataset`), or on a dataset with the D3 columns (a Parquet folder or Hub
dataset id), with the run's evaluation protocol (docs/method.md), then is scored on the run's real test split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel, Trainer, TrainingArguments
from transformers.image_processing_base import ImageProcessingMixin
from transformers.trainer_utils import set_seed

from . import student_protocol as protocol
from .atomic import write_json
from .config import ARCHITECTURES, D3Config
from .data import RealImages, load_test_images
from .factories import net_kwargs
from .models.classifiers import CLASSIFIERS, build_classifier
from .pipelines.pipeline_d3 import D3Pipeline

# hf_d3's own classifiers take images in [0, 1] and normalise them inside.
D3_MODEL_TYPES = tuple(config_cls.model_type for config_cls, _ in CLASSIFIERS.values())


@dataclass
class StudentTrainingConfig:
    """What `recipes/train_student.py` trains, on what, and where it writes. The run's `D3Config` gives the rest: steps
    (`eval_steps`), batch size, learning rate, augmentation (`eval_*`), `seed`, trackers (`report_to`), the real test
    split (`dataset`, `test_split`, `max_test_examples`) and the width / depth of the run's networks."""

    student_model: str | None = field(default=None, metadata={
        "help": "convnet or resnet18_ap (default: the run's eval_architecture), a checkpoint folder or Hub model id, "
                "or a config.json to build a fresh model from"})
    distilled: str | None = field(default=None, metadata={
        "help": "a D3 pipeline folder or Hub repo id (streamed), or a dataset folder / Hub dataset id with image, "
                "label and soft_label columns; default <output_dir>/pipeline"})
    distilled_config_name: str | None = field(default=None, metadata={"help": "the dataset's config (ipc10, ...)"})
    distilled_split: str = "train"
    student_output_dir: str | None = field(default=None, metadata={"help": "default <output_dir>/student"})
    dataloader_num_workers: int = 0


@dataclass
class DistilledData:
    """A student's training set (examples with `image`, `label`, `soft_label`) and its images' shape."""

    train: datasets.Dataset | datasets.IterableDataset
    class_names: list[str]
    channels: int
    resolution: int
    kind: str  # "pipeline" (streamed) or "dataset"


def load_distilled(source: str, config_name: str | None = None, split: str = "train", seed: int = 0) -> DistilledData:
    """A D3 pipeline (folder or Hub repo id: streamed, deterministic by `seed`) or a dataset with the D3 columns
    (a folder `datasets.load_dataset` reads, or a Hub dataset id; `config_name` and `split` choose the part)."""
    path = Path(source)
    if path.is_dir() and (path / "model_index.json").is_file():
        return _from_pipeline(D3Pipeline.from_pretrained(path), seed)
    if path.is_dir():
        try:
            dataset = datasets.load_dataset(str(path), config_name, split=split)
        except Exception as error:
            raise ValueError(f"distilled={source!r} is neither a D3 pipeline (it has no model_index.json) nor a "
                             f"dataset datasets.load_dataset reads: {error}") from error
        return _from_dataset(dataset, source)
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ValueError(f"distilled={source!r} is neither a local folder nor a Hub repo id: give a D3 pipeline "
                         "(folder or repo id) or a dataset (Parquet folder or Hub dataset id) with image, "
                         "label and soft_label columns") from None
    try:
        return _from_pipeline(D3Pipeline.from_pretrained(source), seed)
    except Exception as pipeline_error:
        try:
            dataset = datasets.load_dataset(source, config_name, split=split)
        except Exception as dataset_error:
            raise ValueError(f"distilled={source!r} is neither a D3 pipeline repo ({pipeline_error}) nor a Hub "
                             f"dataset ({dataset_error})") from dataset_error
    return _from_dataset(dataset, source)


def _from_pipeline(pipe: D3Pipeline, seed: int) -> DistilledData:
    decoder = pipe.decoder.config
    return DistilledData(pipe.to_iterable_dataset(seed=seed), list(pipe.latent_store.class_names),
                         decoder.out_channels, decoder.resolution, "pipeline")


def _from_dataset(dataset: datasets.Dataset, source: str) -> DistilledData:
    features = dataset.features
    if not isinstance(features.get("image"), datasets.Image) or "soft_label" not in features:
        columns = {name: type(feature).__name__ for name, feature in features.items()}
        raise ValueError(f"distilled={source!r} has the columns {columns}, not those of a D3 dataset: it needs "
                         "`image` (Image) and `soft_label` (one probability per class), as "
                         "hf_d3.pipelines.pipeline_d3.dataset_features gives")
    if len(dataset) == 0:
        raise ValueError(f"distilled={source!r} has no examples")
    first = dataset[0]
    num_classes, label = len(first["soft_label"]), features.get("label")
    names = list(label.names) if isinstance(label, datasets.ClassLabel) else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"distilled={source!r}: {len(names)} label names but soft labels of {num_classes} classes")
    return DistilledData(dataset, names, 1 if first["image"].mode == "L" else 3, first["image"].width, "dataset")


class DistilledCollator:
    """Batches of D3 examples as tensors: `pixel_values` [B, C, H, W] in [0, 1] (C = `channels`) and `soft_labels`."""

    def __init__(self, channels: int):
        self.mode = {1: "L", 3: "RGB"}[channels]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(np.stack([np.asarray(e["image"].convert(self.mode)) for e in examples]))
        pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
        soft_labels = torch.tensor([e["soft_label"] for e in examples], dtype=torch.float32)
        return {"pixel_values": pixels.float().div_(255).contiguous(), "soft_labels": soft_labels}


@dataclass
class PixelFormat:
    """How images in [0, 1] (1 or 3 channels, any size) become a model's `pixel_values`: converted to `channels`
    (grayscale repeated; RGB by ITU-R 601 luma, as PIL's "L"), resized to `size` (bilinear, antialiased), then
    normalised by mean / std."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.channels:
            if self.channels == 3:
                images = images.expand(-1, 3, -1, -1)
            else:
                luma = torch.tensor((0.299, 0.587, 0.114), device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
                images = (images * luma).sum(1, keepdim=True)
        if tuple(images.shape[-2:]) != self.size:
            images = nn.functional.interpolate(images, size=self.size, mode="bilinear", antialias=True,
                                               align_corners=False).clamp(0, 1)
        mean, std = (torch.tensor(v, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
                     for v in (self.mean, self.std))
        return (images - mean) / std


def pixel_format_for(model: PreTrainedModel, preprocessor: dict | None, resolution: int) -> PixelFormat:
    """The input a student wants: its config's `num_channels` and `image_size` (else its image processor's size, else
    the distilled `resolution`); mean / std from its image processor, none for hf_d3's classifiers, else 0.5."""
    config, preprocessor = model.config, preprocessor or {}
    channels = getattr(config, "num_channels", 3)
    if channels not in (1, 3):
        raise ValueError(f"the student takes num_channels={channels} images; only 1 (grayscale) or 3 (RGB) work")
    size = getattr(config, "image_size", None)
    if size is None and isinstance(preprocessor.get("size"), dict):
        sizes = preprocessor["size"]
        size = (sizes["height"], sizes["width"]) if "height" in sizes else sizes.get("shortest_edge")
    size = resolution if size is None else size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if config.model_type in D3_MODEL_TYPES:
        mean, std = [0.0], [1.0]
    elif preprocessor.get("do_normalize", True) and "image_mean" in preprocessor:
        mean, std = preprocessor["image_mean"], preprocessor["image_std"]
    else:
        mean, std = [0.5], [0.5]
    return PixelFormat(channels, size, _per_channel(mean, channels), _per_channel(std, channels))


def _per_channel(values: float | list[float], channels: int) -> tuple[float, ...]:
    values = [values] if isinstance(values, int | float) else list(values)
    return tuple(values if len(values) == channels else [sum(values) / len(values)] * channels)


def build_student(student_model: str | None, config: D3Config, distilled: DistilledData
                  ) -> tuple[PreTrainedModel, dict | None]:
    """The student, with one output per distilled class, and its image processor's settings (when it has one)."""
    id2label = dict(enumerate(distilled.class_names))
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}
    name = student_model or config.evaluation.eval_architecture
    if name in ARCHITECTURES:
        model = build_classifier(name, distilled.channels, distilled.resolution, len(id2label),
                                 **net_kwargs(name, config.experts.net_width, config.experts.net_depth))
        model.config.id2label, model.config.label2id = id2label, labels["label2id"]
        return model, None
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"student_model={name!r}: no such config file")
        return AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(name, **labels)), None
    model = AutoModelForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, **labels)
    try:
        preprocessor = ImageProcessingMixin.get_image_processor_dict(name)[0]
    except OSError:  # no preprocessor_config.json
        preprocessor = None
    return model, preprocessor


class SoftLabelTrainer(Trainer):
    """`transformers.Trainer` with the student protocol of `hf_d3.evaluation.train_student` (`hf_d3.student_protocol`):
    soft cross-entropy, `augmentation` of the [0, 1] batch before `pixel_format`, the protocol's SGD (weight decay
    `args.weight_decay`: `run_student_training` gives the protocol's) and schedule, and no gradient clipping
    (`max_grad_norm=0`; the Trainer's default clips at 1)."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the gradient accumulation steps

    def __init__(self, *args, pixel_format: PixelFormat, augmentation: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pixel_format, self.augmentation = pixel_format, augmentation

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple:
        """The batch mean of the soft cross-entropy (no `labels` to count: `num_items_in_batch` stays unused)."""
        images = inputs["pixel_values"]
        if model.training and self.augmentation is not None:
            images = self.augmentation(images)
        outputs = model(pixel_values=self.pixel_format(images))
        loss = protocol.soft_cross_entropy(outputs.logits.float(), inputs["soft_labels"])
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            parameters = [p for p in (model or self.model).parameters() if p.requires_grad]
            self.optimizer = protocol.student_optimizer(parameters, self.args.learning_rate, self.args.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
                         ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            self.lr_scheduler = protocol.student_scheduler(optimizer or self.optimizer, num_training_steps)
            self._created_lr_scheduler = True  # the Trainer rebuilds it on the next `train()`
        return self.lr_scheduler


@torch.no_grad()
def accuracy_on(model: nn.Module, test: RealImages, pixel_format: PixelFormat, batch_size: int = 256) -> float:
    """Top-1 accuracy on every image of `test`, in batches."""
    model.eval()
    device, correct = next(model.parameters()).device, 0
    for start in range(0, len(test.labels), batch_size):
        logits = model(pixel_values=pixel_format(test.images[start:start + batch_size].to(device))).logits
        correct += (logits.argmax(1).cpu() == test.labels[start:start + batch_size]).sum().item()
    return correct / len(test.labels)


@dataclass
class StudentResult:
    """What `metrics.json` of a student holds."""

    accuracy: float
    num_test_examples: int
    student_model: str
    model_type: str
    num_parameters: int
    distilled: str
    distilled_kind: str
    steps: int
    settings: dict  # the run's settings the student followed (eval_batch_size, eval_lr, eval_augment, seed, ...)
    pixel_format: dict
    loss_history: list[tuple[int, float]]  # (step, training loss) as the Trainer logged them
    train_time_s: float
    output_dir: str


def run_student_training(config: D3Config, student: StudentTrainingConfig) -> StudentResult | None:
    """Train `student.student_model` on `student.distilled` with the run's protocol, score it on the run's real test
    split, and save the model, its image processor settings (if any) and `metrics.json` in `student_output_dir`.
    Returns the result on the main process and None elsewhere."""
    evaluation, seed = config.evaluation, config.run.seed
    source = student.distilled or str(Path(config.run.output_dir) / "pipeline")
    output_dir = Path(student.student_output_dir or Path(config.run.output_dir) / "student")
    distilled = load_distilled(source, student.distilled_config_name, student.distilled_split, seed)
    test = load_test_images(config.data)
    if len(test.class_names) != len(distilled.class_names):
        raise ValueError(f"distilled={source!r} has {len(distilled.class_names)} classes but the test split of "
                         f"dataset={config.data.dataset!r} has {len(test.class_names)}")
    set_seed(seed)
    model, preprocessor = build_student(student.student_model, config, distilled)
    pixel_format = pixel_format_for(model, preprocessor, distilled.resolution)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=evaluation.eval_steps, learning_rate=evaluation.eval_lr,
        per_device_train_batch_size=evaluation.eval_batch_size, weight_decay=protocol.WEIGHT_DECAY, seed=seed,
        max_grad_norm=0.0, remove_unused_columns=False, save_strategy="no", report_to=config.run.trackers or "none",
        logging_first_step=True, logging_steps=max(1, evaluation.eval_steps // 50),
        dataloader_num_workers=student.dataloader_num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        # Each rank reads its own shards of a streamed pipeline, rather than the main process reading for all.
        accelerator_config={"dispatch_batches": False},
    )
    augmentation = protocol.student_augmentation(distilled.resolution, distilled.channels, evaluation.eval_augment)
    trainer = SoftLabelTrainer(model=model, args=args, train_dataset=distilled.train,
                               data_collator=DistilledCollator(distilled.channels), pixel_format=pixel_format,
                               augmentation=augmentation)
    train_time = trainer.train().metrics["train_runtime"]
    accuracy = accuracy_on(trainer.model, test, pixel_format, evaluation.eval_batch_size)
    trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return None
    if preprocessor:
        write_json(output_dir / "preprocessor_config.json", preprocessor)
    result = StudentResult(
        accuracy=accuracy, num_test_examples=len(test.labels), student_model=student.student_model or
        evaluation.eval_architecture, model_type=model.config.model_type,
        num_parameters=sum(p.numel() for p in model.parameters()), distilled=source, distilled_kind=distilled.kind,
        steps=trainer.state.global_step, settings={**asdict(evaluation), "seed": seed, **asdict(student)},
        pixel_format=asdict(pixel_format), train_time_s=train_time, output_dir=str(output_dir),
        loss_history=[(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log],
    )
    write_json(output_dir / "metrics.json", asdict(result))  # written last: marks the student finished
    return result
