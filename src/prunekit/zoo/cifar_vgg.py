"""CIFAR VGG with BatchNorm, as used by the pruning literature.

Convolutions follow the Network Slimming (Liu et al. 2017) configuration: 3x3 conv-BN-ReLU
blocks separated by 2x2 max-pools, *without* the fifth max-pool of ImageNet VGG. A global
(adaptive) average pool to 1x1 replaces it: on 32x32 inputs this is the same as their
``AvgPool2d(2)``, and it keeps the network size-agnostic (a fifth max-pool would fail on
28x28 inputs, which are 1x1 after four pools).

The default classifier is the one of Li et al. 2017 ("Pruning Filters for Efficient
ConvNets"): ``Linear(512, 512) - BN1d - ReLU - Linear(512, num_classes)``, giving
14,987,722 parameters for VGG-16 with 10 classes (paper: 1.5e7). ``hidden_features=None``
gives the Network Slimming single ``Linear(512, num_classes)`` classifier instead
(VGG-19: 20,035,018 parameters, paper: 20.04M).
"""

from __future__ import annotations

from typing import Final, Literal

from torch import Tensor, nn

from prunekit.zoo.init import init_weights

__all__ = ["VGG_CFGS", "CifarVGG"]

#: Channel configurations; ``"M"`` is a 2x2 max-pool. Only four pools: see module docstring.
VGG_CFGS: Final[dict[int, tuple[int | Literal["M"], ...]]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512),
}


class CifarVGG(nn.Module):
    """VGG-BN for small images: ``features`` (conv-BN-ReLU / max-pool), global pool, ``classifier``.

    Args:
        depth: one of 11, 13, 16, 19 (the number of weighted layers of the ImageNet model).
        num_classes: size of the classifier output.
        in_chans: input channels of the first convolution.
        hidden_features: width of the hidden classifier layer (Li et al. 2017), or ``None``
            for a single linear layer (Network Slimming).

    The forward pass maps ``(N, in_chans, H, W)`` to ``(N, num_classes)`` for ``H, W >= 16``.
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        hidden_features: int | None = 512,
    ) -> None:
        super().__init__()
        if depth not in VGG_CFGS:
            raise ValueError(f"CIFAR VGG depth must be one of {sorted(VGG_CFGS)}, got {depth}")
        layers: list[nn.Module] = []
        channels = in_chans
        for v in VGG_CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # No conv bias: BN right after makes it redundant (and it would be one more
                # tensor to slice when pruning).
                layers += [
                    nn.Conv2d(channels, v, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=False),
                ]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if hidden_features is None:
            self.classifier: nn.Module = nn.Linear(channels, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(channels, hidden_features),
                nn.BatchNorm1d(hidden_features),
                nn.ReLU(inplace=False),
                nn.Linear(hidden_features, num_classes),
            )

        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits of shape ``(N, num_classes)`` for input ``(N, C, H, W)``."""
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)
