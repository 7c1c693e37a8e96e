"""Weight initialisation shared by the zoo's CIFAR models."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module, *, linear_std: float | None = None) -> None:
    """He (fan-out) init for convolutions, BN at identity, and optionally N(0, std) linears.

    He et al. initialise convolutions with the "MSRA" fan-out scheme; the VGG/MobileNet
    CIFAR recipes also draw linear weights from a small normal (``linear_std``).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
