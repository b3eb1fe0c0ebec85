from .classifiers import (
    ConvNetConfig,
    ConvNetForImageClassification,
    ResNet18APConfig,
    ResNet18APForImageClassification,
    build_classifier,
)
from .decoder import D3Decoder
from .latent_store import GaussianLatentStore

__all__ = [
    "ConvNetConfig",
    "ConvNetForImageClassification",
    "D3Decoder",
    "GaussianLatentStore",
    "ResNet18APConfig",
    "ResNet18APForImageClassification",
    "build_classifier",
]
