"""The prunekit model zoo: a timm-style registry and the CIFAR models pruning papers use.

Every registered builder takes keyword-only ``num_classes`` (default 10) and ``in_chans``
(default 3) plus architecture options, and only builds the model (no weights, no data).

>>> model = create_model("resnet56", num_classes=100)
>>> list_models("resnet*")
['resnet110', 'resnet20', 'resnet32', 'resnet56']
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from prunekit.zoo.cifar_mobilenet import CifarMobileNetV2
from prunekit.zoo.cifar_resnet import CifarResNet
from prunekit.zoo.cifar_vgg import CifarVGG
from prunekit.zoo.small_cnn import SmallCNN

__all__ = [
    "ModelNotFoundError",
    "register_model",
    "list_models",
    "create_model",
    "close_matches",
    "is_model",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "vgg16_bn_cifar",
    "vgg19_bn_cifar",
    "mobilenetv2_cifar",
    "small_cnn",
]

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class ModelNotFoundError(KeyError):
    """A model name or builder that does not exist (a ``KeyError`` with a readable message).

    ``str(KeyError("msg"))`` adds quotes around the message; this subclass prints the
    message as-is so command-line tools can show it as one clean line.
    """

    def __str__(self) -> str:
        """Return the message without the quoting ``KeyError`` adds."""
        return str(self.args[0]) if self.args else ""


def close_matches(name: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> str:
    """Return a ``"; did you mean 'a', 'b'?"`` suffix for ``name`` (empty if nothing is close).

    The matching is case-insensitive ``difflib.get_close_matches``; the suffix is meant to
    be appended to an error message.
    """
    lowered = {c.lower(): c for c in candidates}
    key = name.lower()
    hits = difflib.get_close_matches(key, list(lowered), n=n, cutoff=0.6)
    # difflib misses short prefixes of long names ("vgg16" vs "vgg16_bn_cifar"): add those.
    hits += [c for c in sorted(lowered) if key and c.startswith(key) and c not in hits][: max(0, n - len(hits))]
    if not hits:
        return ""
    return "; did you mean " + ", ".join(repr(lowered[h]) for h in hits) + "?"


def register_model(fn: BuilderT) -> BuilderT:
    """Register ``fn`` as a zoo model under its function name and return ``fn`` unchanged.

    Raises ``ValueError`` if a *different* builder already uses that name (re-registering
    the same function, e.g. after ``importlib.reload``, is allowed).
    """
    name = fn.__name__
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"model name {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Return the sorted names of registered models matching the shell-style ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    """Return whether ``name`` is a registered zoo model."""
    return name in _REGISTRY


def create_model(name: str, *, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` (randomly initialised) and return it.

    ``num_classes`` and ``in_chans`` are passed to the builder together with ``kwargs``
    (architecture options such as ``width_mult``). Raises ``ModelNotFoundError`` (a
    ``KeyError``) listing close matches when ``name`` is not registered.
    """
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown zoo model {name!r}{close_matches(name, list(_REGISTRY))} "
            f"(available: {', '.join(list_models())})"
        ) from None
    return builder(num_classes=num_classes, in_chans=in_chans, **kwargs)


# --------------------------------------------------------------------------- builders


@register_model
def resnet20(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """Return a CIFAR ResNet-20 (3 blocks per stage) with option-B projection shortcuts.

    272,474 parameters with 10 classes (paper, option A: 0.27M = 269,722).
    """
    return CifarResNet(20, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def resnet32(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """Return a CIFAR ResNet-32 (5 blocks per stage) with option-B projection shortcuts.

    466,906 parameters with 10 classes (paper, option A: 0.46M = 464,154).
    """
    return CifarResNet(32, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def resnet56(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """Return a CIFAR ResNet-56 (9 blocks per stage) with option-B projection shortcuts.

    855,770 parameters with 10 classes (paper, option A: 0.85M = 853,018).
    """
    return CifarResNet(56, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def resnet110(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """Return a CIFAR ResNet-110 (18 blocks per stage) with option-B projection shortcuts.

    1,730,714 parameters with 10 classes (paper, option A: 1.7M = 1,727,962).
    """
    return CifarResNet(110, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def vgg16_bn_cifar(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarVGG:
    """Return the CIFAR VGG-16-BN of Li et al. 2017 (13 conv layers, 512-512-classes MLP head).

    14,987,722 parameters with 10 classes (paper: 1.5e7); ``hidden_features=None`` gives
    the single-linear head of Network Slimming (14,724,042).
    """
    return CifarVGG(16, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def vgg19_bn_cifar(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarVGG:
    """Return the CIFAR VGG-19-BN (16 conv layers, 512-512-classes MLP head by default).

    20,298,698 parameters with 10 classes; ``hidden_features=None`` gives the Network
    Slimming model (20,035,018; paper: 20.04M).
    """
    return CifarVGG(19, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def mobilenetv2_cifar(
    *, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, **kwargs: Any
) -> CifarMobileNetV2:
    """Return MobileNetV2 with CIFAR strides (32x32 in, 4x4 before pooling).

    2,236,682 parameters with 10 classes at ``width_mult=1.0`` (same as torchvision's
    ``mobilenet_v2(num_classes=10)``; only strides differ).
    """
    return CifarMobileNetV2(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)


@register_model
def small_cnn(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> SmallCNN:
    """Return the small residual CNN of the digits demo (pass ``in_chans=1`` for digits).

    168,170 parameters with 1 input channel and 10 classes (168,746 with 3).
    """
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, **kwargs)
