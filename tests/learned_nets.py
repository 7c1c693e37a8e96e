"""A tiny task for the methods that prune while training: a network built to solve it, with a
planted dead channel and a planted important one (tests/methods/test_learned_masks.py and the
per-method tests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from nets import cbr
from prunekit.recover import TrainConfig

X = torch.randn(1, 3, 8, 8)
DEAD, IMPORTANT = 3, 5  # channels of the first layer


def planted() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """conv3x3(3, 8) -> BN -> ReLU -> conv1x1(8, 6) -> BN -> ReLU -> pool -> fc(6, 5) built to
    solve its task: the second layer's output 0 is ``sum_c w_c a_c`` of the first layer's
    activations ``a_c`` (``w_5 = 3``, ``w_3 = 0``, the others 1), the labels are the quintiles
    of its pooled value and the classifier thresholds it at those quintiles. So every live
    channel of the first layer matters, channel 5 the most, and channel 3 is dead: its BN shift
    is -3 (the ReLU passes it with probability 0.13%) and no weight reads it. Four training and
    three held-out batches of 16 random images (three, so that a resumed run must know where
    it was in them)."""
    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 8), cbr(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    weights = torch.ones(8)
    weights[DEAD], weights[IMPORTANT] = 0.0, 3.0
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(7)]
    with torch.no_grad():
        model[0][1].bias[DEAD] = -3.0
        conv = model[1][0].weight  # (6, 8, 1, 1)
        conv.mul_(0.1)
        conv[0, :, 0, 0] = weights
        conv[:, DEAD] = 0
        model.train()
        for x in xs:
            model(x)  # BN statistics of the data
        model.eval()
        feature = torch.cat([model[:4](x)[:, 0] for x in xs])
        edges = torch.quantile(feature, torch.tensor([0.2, 0.4, 0.6, 0.8]))
        # Ordinal thresholds: logit_k = sum_{j < k} scale * (f - e_j), so class k wins between e_k and e_k+1.
        scale = 20.0 / float(feature.std())
        model[4].weight.zero_()
        model[4].bias.zero_()
        for k in range(1, 5):
            model[4].weight[k, 0] = scale * k
            model[4].bias[k] = -scale * float(edges[:k].sum())
        labels = torch.bucketize(feature, edges).split(16)
    data = list(zip(xs, labels))
    return model, data[:4], data[4:]


def config(epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=0.05, momentum=0.9, weight_decay=0.0, schedule="constant", seed=0,
                       tensorboard=False)


class Interrupting:
    """``batches`` as a loader that raises KeyboardInterrupt at its ``stop``-th batch overall
    (a kill in the middle of an epoch)."""

    def __init__(self, batches: list, stop: int) -> None:
        self.batches, self.stop, self.served = batches, stop, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            self.served += 1
            if self.served == self.stop:
                raise KeyboardInterrupt
            yield b
