"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", Section 4.2).

The network is a 3x3 stem convolution with 16 channels followed by three stages of
``n = (depth - 2) / 6`` basic blocks with 16, 32 and 64 channels (the second and third
stage halve the spatial size in their first block), global average pooling and a
linear classifier.

The paper uses "option A" shortcuts (identity plus zero-padded channels, spatial
subsampling by striding) where the shape changes. Those zero pads hard-code the channel
counts, so removing channels from a stage would need the pad sizes rewritten. We use
"option B" instead: a 1x1 convolution with stride ``s`` plus BatchNorm on the shortcut
where the shape changes (identity elsewhere). That adds 2,752 parameters to every depth
(``16*32 + 2*32`` and ``32*64 + 2*64``), i.e. ~1% for ResNet-20 and ~0.3% for ResNet-56.
"""

from __future__ import annotations

from torch import Tensor, nn

from prunekit.zoo.init import init_weights

__all__ = ["BasicBlock", "CifarResNet"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """Return a bias-free 3x3 convolution with padding 1 (the bias is redundant before BN)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016, Fig. 2 left).

    ``downsample`` is an option-B projection (1x1 conv with the block's stride + BN) when
    the input and output shapes differ, otherwise ``None`` (identity shortcut).
    """

    expansion: int = 1

    def __init__(self, in_planes: int, planes: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        # Separate, non-inplace ReLUs: in-place ops and shared modules confuse graph
        # tracers and autograd-based importance scores used by pruning.
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add so the shortcut tensor is never mutated (keeps tracing simple).
        out = out + identity
        return self.relu2(out)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 with option-B (projection) shortcuts.

    Args:
        depth: total number of weighted layers; must satisfy ``(depth - 2) % 6 == 0``
            (20, 32, 44, 56, 110, 1202 in the paper).
        num_classes: size of the linear classifier output.
        in_chans: input channels of the stem convolution (1 for grayscale data).
        widths: channels of the three stages (16, 32, 64 in the paper).

    The forward pass maps ``(N, in_chans, H, W)`` to logits ``(N, num_classes)`` for any
    ``H, W >= 1`` thanks to global average pooling (32x32 CIFAR, 28x28 Fashion-MNIST, ...).
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 56), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_layer(widths[0], widths[0], n, stride=1)
        self.layer2 = self._make_layer(widths[0], widths[1], n, stride=2)
        self.layer3 = self._make_layer(widths[1], widths[2], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

        init_weights(self)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, *, stride: int) -> nn.Sequential:
        """Return a stage of ``blocks`` basic blocks; only the first one may stride/project."""
        layers = [BasicBlock(in_planes, planes, stride=stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits of shape ``(N, num_classes)`` for input ``(N, C, H, W)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)
