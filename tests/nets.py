"""Small hand-built networks that exercise every coupling the engine must get right."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = nn.Sequential(cbr(16, 12), nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.b = nn.Sequential(cbr(16, 12), nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = x - self.b(x)
        return self.fc(x.mean((2, 3)))


class ConcatSplit(nn.Module):
    """cat of two branches, an unequal split with sizes in an attribute, an equal chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q = cbr(3, 8), cbr(3, 12)
        self.sizes = [8, 12]
        self.u, self.v = cbr(8, 6), cbr(12, 6)
        self.w = cbr(12, 10)
        self.fc = nn.Linear(10 + 6, 4)

    def forward(self, x):
        y = torch.cat([self.p(x), self.q(x)], dim=1)
        a, b = torch.split(y, self.sizes, dim=1)
        z = torch.cat([self.u(a), self.v(b)], 1)
        c, d = z.chunk(2, dim=1)
        out = self.w(torch.cat([c * 2, d], 1))
        return self.fc(torch.cat([out.mean((2, 3)), c.amax((2, 3))], 1))


class DepthwiseSE(nn.Module):
    """MobileNet-style inverted residual with squeeze-excitation and hardswish."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.expand = cbr(16, 32, 1)
        self.dw = cbr(32, 32, 3, groups=32)
        self.se1 = nn.Conv2d(32, 8, 1)
        self.se2 = nn.Conv2d(8, 32, 1)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        s = F.hardsigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        y = F.hardswish(y * s)
        x = x + self.project(y)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GroupedShuffle(nn.Module):
    """ResNeXt-style grouped conv (4 groups of 6) followed by a channel shuffle via view/transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = cbr(3, 24, 1)
        self.g = cbr(24, 24, 3, groups=4)
        self.c3 = cbr(24, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, 3)

    def forward(self, x):
        y = self.g(self.c1(x))
        b, c, h, w = y.shape
        y = y.view(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)
        y = self.c3(y)
        y = F.adaptive_avg_pool2d(y, 4)
        return self.fc(torch.flatten(y, 1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.attn_dim = dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim))


class TinyViT(nn.Module):
    """Patch embed, class token, position embedding, layer-scale, attention and MLP (no LayerNorm,
    so the exactness oracle applies)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.attn = Attention(dim, heads)
        self.gamma = nn.Parameter(torch.rand(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = x + self.gamma * self.attn(x)
        x = x + self.mlp(x)
        return self.head(x[:, 0])


class MultiIO(nn.Module):
    """Two inputs, two outputs, a module reused on both inputs, a training-only aux branch."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = cbr(3, 10)
        self.fuse = cbr(10, 14)
        self.out1 = nn.Conv2d(14, 2, 1)
        self.out2 = nn.Linear(14, 3)
        self.aux = nn.Sequential(nn.Conv2d(10, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 2))

    def forward(self, a, b):
        h = self.shared(a) + self.shared(b)
        y = self.fuse(h)
        o1, o2 = self.out1(y), self.out2(y.mean((2, 3)))
        if self.training:
            return o1, o2, self.aux(h)
        return o1, o2


class FlattenVGG(nn.Module):
    """Flatten of a (C, H, W) map into a linear layer: each channel owns H*W input features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(cbr(3, 8), nn.MaxPool2d(2), cbr(8, 16), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(16 * 4 * 4, 20), nn.ReLU(), nn.Dropout(), nn.Linear(20, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class Transposed(nn.Module):
    """Encoder-decoder with a transposed conv, PReLU and a skip concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = cbr(3, 12, 3, 2)
        self.up = nn.ConvTranspose2d(12, 10, 2, 2)
        self.act = nn.PReLU(10)
        self.skip = cbr(3, 6)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y = self.act(self.up(self.enc(x)))
        return self.out(torch.cat([y, self.skip(x)], 1))


NETS = {
    "residual": (Residual, lambda: torch.randn(2, 3, 16, 16)),
    "concat_split": (ConcatSplit, lambda: torch.randn(2, 3, 16, 16)),
    "depthwise_se": (DepthwiseSE, lambda: torch.randn(2, 3, 16, 16)),
    "grouped_shuffle": (GroupedShuffle, lambda: torch.randn(2, 3, 16, 16)),
    "tiny_vit": (TinyViT, lambda: torch.randn(2, 3, 16, 16)),
    "flatten_vgg": (FlattenVGG, lambda: torch.randn(2, 3, 16, 16)),
    "transposed": (Transposed, lambda: torch.randn(2, 3, 16, 16)),
    "multi_io": (MultiIO, lambda: (torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16))),
}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN layers non-trivial statistics so removed channels would matter if mis-sliced."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


class PlainConvs(nn.Module):
    """A plain (VGG-like) CNN with same-shape convs of several kinds, the ResConv sites: conv-BN
    (c1), grouped conv-BN (c2), dilated conv with a bias and no BN (c3), 1x1 conv-BN after a
    strided conv (c4); the stem, the strided conv and the classifier change the shape."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.c1 = cbr(8, 8)
        self.c2 = cbr(8, 8, groups=2)
        self.c3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU())
        self.down = cbr(8, 8, s=2)
        self.c4 = cbr(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.c3(self.c2(self.c1(self.stem(x))))
        return self.fc(self.c4(self.down(x)).mean((2, 3)))


class BasicBlock(nn.Module):
    """torchvision's basic block layout: one ReLU module used inside the branch and after the add."""

    def __init__(self, c: int, k: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def branch(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return self.relu(self.branch(x) + x)


class TinyResNet(nn.Module):
    """Four identity-shortcut blocks of four different costs in two stages (8 channels at
    16x16, 12 at 8x8), joined by a strided conv (no shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8, k=1))
        self.down = cbr(8, 12, s=2)
        self.layer2 = nn.Sequential(BasicBlock(12), BasicBlock(12, k=1))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def warmed(net: nn.Module, shape: tuple[int, ...] = (16, 3, 16, 16), seed: int = 0) -> nn.Module:
    """``net`` with random weights and BatchNorm statistics gathered on random inputs (so
    folding a BN is not the identity), in eval mode."""
    torch.manual_seed(seed)
    net.train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for _ in range(3):
            net(torch.randn(*shape))
    return net.eval()
