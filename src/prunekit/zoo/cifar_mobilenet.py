"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs.

Same layers as ``torchvision.models.mobilenet_v2`` (so the parameter count is identical:
2,236,682 with 10 classes at ``width_mult=1.0``), but, as is customary for CIFAR
(e.g. kuangliu/pytorch-cifar), the stem convolution and the first strided stage (24
channels) use stride 1 instead of 2. A 32x32 input therefore ends at 4x4 instead of 1x1.
"""

from __future__ import annotations

from typing import Final

from torch import Tensor, nn

from prunekit.zoo.init import init_weights

__all__ = ["MOBILENETV2_CIFAR_SETTINGS", "InvertedResidual", "CifarMobileNetV2", "make_divisible"]

#: (expansion t, output channels c, repeats n, first stride s) per stage; the strides of
#: the first two downsampling points of the ImageNet model (stem, c=24) are set to 1.
MOBILENETV2_CIFAR_SETTINGS: Final[tuple[tuple[int, int, int, int], ...]] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet model
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Return ``value`` rounded to the nearest multiple of ``divisor`` (never below 90% of it).

    This is the rounding of the reference MobileNet implementation, so width multipliers
    give the same channel counts as torchvision.
    """
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # do not round down by more than 10%
        new_value += divisor
    return new_value


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Return ``Conv2d(no bias) - BatchNorm2d - ReLU6`` with "same" padding."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 linear projection.

    The residual add is used only when the stride is 1 and input/output channels match;
    the expansion conv is omitted when ``expand_ratio == 1`` (as in the paper).
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(in_ch, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
            # Linear bottleneck: no activation after the projection (Sandler et al. 3.2).
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x + conv(x)`` when the block is residual, else ``conv(x)``."""
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (module names as in torchvision: ``features``, ``classifier``).

    Args:
        num_classes: size of the classifier output.
        in_chans: input channels of the stem convolution.
        width_mult: channel multiplier applied to every layer (rounded to multiples of 8);
            the last 1x1 conv keeps 1280 channels unless ``width_mult > 1``.
        dropout: dropout probability before the classifier (0.2 in the paper).

    The forward pass maps ``(N, in_chans, H, W)`` to ``(N, num_classes)`` for any size
    (global average pooling).
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        channels = make_divisible(32 * width_mult)
        last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_relu6(in_chans, channels, 3, stride=1)]  # stride 2 on ImageNet
        for t, c, n, s in MOBILENETV2_CIFAR_SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out_ch, stride=s if i == 0 else 1, expand_ratio=t))
                channels = out_ch
        features.append(_conv_bn_relu6(channels, last_channel, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))

        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits of shape ``(N, num_classes)`` for input ``(N, C, H, W)``."""
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)
