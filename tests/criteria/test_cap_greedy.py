"""CaP's greedy joint selection against brute-force least squares and exhaustive search."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

import prunekit as pk
from prunekit import criteria


def _mlp(hidden: torch.Tensor, w2: torch.Tensor) -> tuple[nn.Module, list]:
    """An MLP whose hidden activations on the one calibration batch are exactly ``hidden``:
    the first layer is the identity on inputs ``hidden`` (all >= 0, so the ReLU keeps them)."""
    n = hidden.shape[1]
    model = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, w2.shape[0])).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(n))
        model[0].bias.zero_()
        model[2].weight.copy_(w2)
    return model, [(hidden.float(), None)]


def _scores(model: nn.Module, batches: list) -> np.ndarray:
    graph = pk.trace(model, batches[0][0][:1], ignore=["2"])
    group = [g for g in graph.groups if g.name == "0"][0]
    return criteria.score_groups(model, [group], "cap", loader=batches)[0]


def _lstsq_loss(h: np.ndarray, w: np.ndarray, removed: tuple[int, ...]) -> float:
    """Independent oracle: mean squared error of refitting the output from the kept channels
    plus a constant by ``numpy.linalg.lstsq``."""
    y = h @ w.T
    kept = [i for i in range(h.shape[1]) if i not in removed]
    a = np.hstack([h[:, kept], np.ones((len(h), 1))])
    sol = np.linalg.lstsq(a, y, rcond=None)[0]
    return float(((a @ sol - y) ** 2).sum(1).mean())


def _relu_features(rows: int, n: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1


def test_duplicated_channels_are_never_both_removed() -> None:
    h = _relu_features(64, 4, 0)
    h[:, 1] = h[:, 0]  # channels 0 and 1 are the same unit
    # The duplicated unit carries the most weight, but either copy alone costs nothing to remove.
    w2 = torch.tensor([[1.5, 1.0, 0.3, -0.2], [-1.0, -1.2, 0.2, 0.4]])
    model, batches = _mlp(h, w2)
    scores = _scores(model, batches)
    order = np.argsort(scores, kind="stable")
    assert set(order[:1]) <= {0, 1}  # one copy goes first: its loss is zero
    assert len({0, 1} & set(order[:2])) == 1, order  # k=2 of 4: exactly one copy goes
    # Leave-one-out (each channel's loss alone, the first greedy step) removes both copies
    # at k=2; the greedy pair is no worse, and here much better.
    hn, wn = h.float().double().numpy(), w2.double().numpy()  # the rows the model sees
    loo = np.argsort([_lstsq_loss(hn, wn, (c,)) for c in range(4)], kind="stable")
    assert set(loo[:2]) == {0, 1}
    greedy_pair = tuple(order[:2])
    assert _lstsq_loss(hn, wn, greedy_pair) <= _lstsq_loss(hn, wn, tuple(loo[:2]))
    assert _lstsq_loss(hn, wn, greedy_pair) < 0.2 * _lstsq_loss(hn, wn, (0, 1))
    for k in (1, 2, 3):  # and at no k are both copies gone
        assert len({0, 1} & set(order[:k])) <= 1, (k, order)


def test_scores_are_the_refit_loss_of_the_greedy_sets() -> None:
    """Scores are the loss after removing every channel up to it: the lstsq refit loss of
    each prefix of the order, and each step's choice is the best extension of the prefix."""
    h = _relu_features(80, 6, 1)
    h[:, 4] = 0.6 * h[:, 2] + 0.4 * h[:, 3]  # correlated columns, so the greedy order is not leave-one-out's
    w2 = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    model, batches = _mlp(h, w2)
    scores = _scores(model, batches)
    order = np.argsort(scores, kind="stable")
    hn, wn = h.float().double().numpy(), w2.double().numpy()  # the rows the model sees
    energy = float(((hn @ wn.T) ** 2).sum(1).mean())
    for t in range(1, 6):
        prefix = tuple(order[:t])
        # The criterion's ridge (1e-6 of the mean diagonal) makes an exact zero loss slightly positive.
        np.testing.assert_allclose(scores[order[t - 1]], _lstsq_loss(hn, wn, prefix), rtol=1e-3, atol=1e-5 * energy)
        best = min(_lstsq_loss(hn, wn, tuple(order[:t - 1]) + (c,)) for c in range(6) if c not in order[:t - 1])
        np.testing.assert_allclose(_lstsq_loss(hn, wn, prefix), best, rtol=1e-3, atol=1e-5 * energy)


def test_greedy_pair_is_the_exhaustive_best_when_losses_add() -> None:
    """Centred, mutually orthogonal features: the compensated loss of a set is the sum of its
    channels' losses, so greedy is optimal and must match the exhaustive search of pairs."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(96, 6)) - rng.normal(size=(96, 6)).mean(0))
    q = q - q.mean(0)  # centre, then re-orthogonalise (the constant is absorbed by the refit)
    q, _ = np.linalg.qr(q)
    q = q - q.mean(0)
    shift = 1.0 - q.min()  # the ReLU must pass the inputs; a constant shift is absorbed by the bias
    h = torch.from_numpy(q * np.sqrt(96) + shift)
    for seed in range(4):
        w2 = torch.randn(2, 6, generator=torch.Generator().manual_seed(10 + seed))
        model, batches = _mlp(h, w2)
        order = np.argsort(_scores(model, batches), kind="stable")
        hn, wn = h.float().double().numpy(), w2.double().numpy()  # the rows the model sees
        best = min(_lstsq_loss(hn, wn, pair) for pair in itertools.combinations(range(6), 2))
        np.testing.assert_allclose(_lstsq_loss(hn, wn, tuple(order[:2])), best, rtol=1e-4, atol=1e-8)


def test_conv_consumers_of_a_coupled_group_sum_their_losses() -> None:
    """Two convs reading the same channels: each greedy step minimises the summed refit loss."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 5, 1)
            self.b = nn.Conv2d(5, 3, 3, padding=1)
            self.c = nn.Conv2d(5, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(h).mean((2, 3)) + self.c(h).mean((2, 3)).sum(1, keepdim=True)

    model = Two().eval()
    batches = [(torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(4)), None)]
    graph = pk.trace(model, torch.randn(1, 2, 5, 5), ignore=["b", "c"])
    group = [g for g in graph.groups if g.name == "a"][0]
    scores = criteria.score_groups(model, [group], "cap", loader=batches)[0]
    order = np.argsort(scores, kind="stable")
    from prunekit.criteria.reconstruction import consumer_rows

    rows = consumer_rows(model, [group], batches)

    def loss(removed: tuple[int, ...]) -> float:
        total = 0.0
        for name in ("b", "c"):
            mod = getattr(model, name)
            x = rows[name].numpy()
            k = int(np.prod(mod.weight.shape[2:]))
            w = mod.weight.detach().double().flatten(1).numpy()
            cols = tuple(i * k + j for i in removed for j in range(k))
            total += _lstsq_loss(x, w, cols)
        return total

    for t in range(1, 5):
        np.testing.assert_allclose(scores[order[t - 1]], loss(tuple(order[:t])), rtol=1e-3, atol=1e-7)
        best = min(loss(tuple(order[:t - 1]) + (c,)) for c in range(5) if c not in order[:t - 1])
        np.testing.assert_allclose(loss(tuple(order[:t])), best, rtol=1e-3, atol=1e-7)
