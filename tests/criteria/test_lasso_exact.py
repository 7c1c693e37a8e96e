"""The ``lasso`` criterion's top-k against scikit-learn's ``Lasso`` support at a penalty
bisected to exactly k channels (the authors' procedure), for every k."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import Lasso
from torch import nn

import prunekit as pk
from prunekit import criteria


def _support(design: np.ndarray, y: np.ndarray, alpha: float) -> set[int]:
    coef = Lasso(alpha=alpha, positive=True, fit_intercept=False, max_iter=100_000, tol=1e-12).fit(design, y).coef_
    return set(np.flatnonzero(coef > 1e-12).tolist())


def _bisected_support(design: np.ndarray, y: np.ndarray, k: int) -> set[int] | None:
    """Bisect the penalty (geometrically) until sklearn's positive LASSO keeps exactly ``k``
    channels; None if no penalty tried does (e.g. two channels entering together)."""
    lo, hi = 1e-9, float(np.abs(design.T @ y).max() / len(y))
    for _ in range(80):
        alpha = (lo * hi) ** 0.5
        support = _support(design, y, alpha)
        if len(support) == k:
            return support
        lo, hi = (alpha, hi) if len(support) > k else (lo, alpha)
    return None


def _check_every_k(scores: np.ndarray, design: np.ndarray, y: np.ndarray) -> None:
    n = design.shape[1]
    for k in range(1, n):
        support = _bisected_support(design, y, k)
        assert support is not None, k
        top = set(np.argsort(-scores, kind="stable")[:k].tolist())
        assert top == support, (k, top, support)


def _group(model: nn.Module, example: torch.Tensor, name: str, ignore: list[str]):
    graph = pk.trace(model, example, ignore=ignore)
    return [g for g in graph.groups if g.name == name][0]


def _contributions(h: torch.Tensor, consumer: nn.Module) -> np.ndarray:
    """Independent design: column ``c`` is the consumer's output (no bias) from input channel
    ``c`` alone, every output entry a row."""
    cols = []
    for c in range(h.shape[1]):
        only = torch.zeros_like(h)
        only[:, c] = h[:, c]
        if isinstance(consumer, nn.Conv2d):
            out = F.conv2d(only, consumer.weight, None, consumer.stride, consumer.padding)
        else:
            out = F.linear(only, consumer.weight)
        cols.append(out.double().flatten())
    return torch.stack(cols, 1).numpy()


def test_linear_consumer_every_k() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    batches = [(torch.randn(40, 5, generator=torch.Generator().manual_seed(3)), None) for _ in range(2)]
    group = _group(model, torch.randn(1, 5), "0", ["2"])
    scores = criteria.score_groups(model, [group], "lasso", loader=batches)[0]
    with torch.no_grad():
        h = torch.cat([model[1](model[0](x)) for x, _ in batches])
        design = _contributions(h, model[2])
    _check_every_k(scores, design, design.sum(1))


def test_conv_consumer_every_k() -> None:
    """A 3x3 conv reading 8 channels (the issue's case: the grid kept the wrong 4)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    batches = [(torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(5)), None)]
    group = _group(model, torch.randn(1, 3, 6, 6), "0", ["2"])
    scores = criteria.score_groups(model, [group], "lasso", loader=batches)[0]
    with torch.no_grad():
        h = model[1](model[0](batches[0][0]))
        design = _contributions(h, model[2])
    _check_every_k(scores, design, design.sum(1))


def test_multi_consumer_group_is_one_stacked_problem() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 6, 1)
            self.b = nn.Conv2d(6, 3, 3, padding=1)
            self.c = nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(h).mean((2, 3)) + self.c(h).mean((2, 3)).sum(1, keepdim=True)

    torch.manual_seed(2)
    model = Two().eval()
    batches = [(torch.randn(5, 2, 5, 5, generator=torch.Generator().manual_seed(6)), None)]
    group = _group(model, torch.randn(1, 2, 5, 5), "a", ["b", "c"])
    scores = criteria.score_groups(model, [group], "lasso", loader=batches)[0]
    with torch.no_grad():
        h = torch.relu(model.a(batches[0][0]))
        design = np.vstack([_contributions(h, model.b), _contributions(h, model.c)])
    _check_every_k(scores, design, design.sum(1))


def test_channels_entering_together_tie() -> None:
    """Channels with disjoint activations are orthogonal, so each enters the path at a penalty
    proportional to its squared contribution; channels 1 and 4 are given equal ones. They tie,
    and every k that does not split them is the bisected support."""
    rows, n = 60, 6
    h = torch.zeros(rows, n)
    gen = torch.Generator().manual_seed(7)
    for c in range(n):
        h[c::n, c] = torch.rand(rows // n, generator=gen) + 0.5  # disjoint supports
    h[:, 4] = 0.0
    h[4::n, 4] = h[1::n, 1]  # same values, other rows
    w2 = torch.randn(3, n, generator=gen)
    w2[:, 4] = w2[:, 1]
    model = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(n))
        model[0].bias.zero_()
        model[2].weight.copy_(w2)
    group = _group(model, h[:1], "0", ["2"])
    scores = criteria.score_groups(model, [group], "lasso", loader=[(h, None)])[0]
    np.testing.assert_allclose(scores[1], scores[4], rtol=1e-9)
    with torch.no_grad():
        design = _contributions(h, model[2])
    y = design.sum(1)
    order = np.argsort(-scores, kind="stable").tolist()
    split = max(order.index(1), order.index(4))  # the k that keeps one of the pair
    for k in range(1, n):
        top = set(order[:k])
        if k == split:
            assert len(top & {1, 4}) == 1
            continue
        assert top == _bisected_support(design, y, k), k
