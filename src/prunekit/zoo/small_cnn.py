"""A small residual CNN for the embedded demo (scikit-learn 8x8 digits upsampled to 16x16/32x32).

Layout (default widths 32-64-128, ~168k parameters)::

    stem   conv3x3(in, 32)            - BN - ReLU
    down1  conv3x3(32, 64, stride 2)  - BN - ReLU
    res    conv3x3(64, 64) - BN - ReLU - conv3x3(64, 64) - BN   (+ down1 output) - ReLU
    down2  conv3x3(64, 128, stride 2) - BN - ReLU
    head   global average pool - Linear(128, num_classes)

The residual add couples the output channels of ``down1`` and ``res.conv2``: a pruner
must remove the same channels from both, which is what the demo is meant to show.
"""

from __future__ import annotations

from torch import Tensor, nn

from prunekit.zoo.init import init_weights

__all__ = ["SmallCNN"]


def _conv_bn(in_ch: int, out_ch: int, *, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Return a bias-free 3x3 convolution and its BatchNorm."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_ch)


class SmallCNN(nn.Module):
    """Four-stage conv-BN-ReLU network with one residual block, global pool and linear head.

    Args:
        num_classes: size of the classifier output.
        in_chans: input channels; pass 1 for the grayscale digits demo (the default is 3
            like every zoo model, so ``create_model`` behaves the same for all names).
        widths: channels of the stem, the residual stage and the last stage.

    The forward pass maps ``(N, in_chans, H, W)`` to ``(N, num_classes)`` for any ``H, W``.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (32, 64, 128),
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem_conv, self.stem_bn = _conv_bn(in_chans, w1)
        self.stem_relu = nn.ReLU(inplace=False)
        self.down1_conv, self.down1_bn = _conv_bn(w1, w2, stride=2)
        self.down1_relu = nn.ReLU(inplace=False)
        self.res_conv1, self.res_bn1 = _conv_bn(w2, w2)
        self.res_relu1 = nn.ReLU(inplace=False)
        self.res_conv2, self.res_bn2 = _conv_bn(w2, w2)
        self.res_relu2 = nn.ReLU(inplace=False)
        self.down2_conv, self.down2_bn = _conv_bn(w2, w3, stride=2)
        self.down2_relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits of shape ``(N, num_classes)`` for input ``(N, C, H, W)``."""
        x = self.stem_relu(self.stem_bn(self.stem_conv(x)))
        x = self.down1_relu(self.down1_bn(self.down1_conv(x)))
        r = self.res_relu1(self.res_bn1(self.res_conv1(x)))
        r = self.res_bn2(self.res_conv2(r))
        x = self.res_relu2(x + r)
        x = self.down2_relu(self.down2_bn(self.down2_conv(x)))
        return self.fc(self.avgpool(x).flatten(1))
