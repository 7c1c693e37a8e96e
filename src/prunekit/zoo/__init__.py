"""The prunekit model zoo: CIFAR-style models, a timm-style registry and model-spec resolving."""

from __future__ import annotations

# models and resolve: registry, zoo builders and spec resolving (see models.py / resolve.py).
from prunekit.zoo.models import (
    ModelNotFoundError,
    create_model,
    is_model,
    list_models,
    mobilenetv2_cifar,
    register_model,
    resnet20,
    resnet32,
    resnet56,
    resnet110,
    small_cnn,
    vgg16_bn_cifar,
    vgg19_bn_cifar,
)
from prunekit.zoo.resolve import load_weights, resolve_model

# data: data sets by spec string and seeded loaders (see data.py).
from prunekit.zoo.data import DATASET_NAMES, DatasetInfo, load_dataset, make_loader

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "load_dataset",
    "make_loader",
    "ModelNotFoundError",
    "create_model",
    "is_model",
    "list_models",
    "load_weights",
    "mobilenetv2_cifar",
    "register_model",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resolve_model",
    "small_cnn",
    "vgg16_bn_cifar",
    "vgg19_bn_cifar",
]
