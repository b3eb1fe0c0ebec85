"""Distributional Dataset Distillation (D3) for the Hugging Face ecosystem."""

from .models import (
    ConvNetConfig,
    ConvNetForImageClassification,
    D3Decoder,
    GaussianLatentStore,
    ResNet18APConfig,
    ResNet18APForImageClassification,
    build_classifier,
)
from .pipelines import D3Pipeline, D3PipelineOutput
from .storage import StorageReport
from .version import __version__

__all__ = [
    "ConvNetConfig",
    "ConvNetForImageClassification",
    "D3Decoder",
    "D3Pipeline",
    "D3PipelineOutput",
    "GaussianLatentStore",
    "ResNet18APConfig",
    "ResNet18APForImageClassification",
    "StorageReport",
    "__version__",
    "build_classifier",
]
