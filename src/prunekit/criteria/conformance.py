"""A conformance check for criteria, in the style of scikit-learn's ``check_estimator``.

:func:`check_criterion` scores every channel group of a small conv net with BatchNorm and a
residual sum (built here, so the check needs nothing from the test suite) and asserts what
:func:`prunekit.prune` relies on:

* **shape**: one finite score per channel of every group;
* **determinism**: scoring twice with the same seed (and the same data) gives the same
  scores, bit for bit;
* **side effects**: scoring leaves the model's parameters, buffers and train/eval mode as
  they were;
* **dead channel**: a planted channel that outputs exactly zero and is read by no weight
  scores strictly lowest in its group, unless the criterion is listed in
  :data:`BLIND_TO_DEAD_CHANNELS` with the reason it cannot see it.

A new criterion is checked with ``check_criterion("my_criterion")`` (or the function
itself); a failure raises :class:`AssertionError` naming the criterion and the property.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

BLIND_TO_DEAD_CHANNELS: dict[str, str] = {
    "random": "its scores are random draws that ignore the weights and the data",
    "fpgm": "it scores redundancy (summed distance to the other filters), not strength: a zero filter "
            "is lowest only when the other filters happen to be centred on the origin",
}
"""Criteria exempt from the dead-channel property, with the reason (add yours here)."""

DEAD_CHANNEL = 5
"""The planted dead channel: this output channel of the net's ``body`` conv."""

_SEED = 0
_BATCHES = 3


class _CheckNet(nn.Module):
    """Two coupled producers (``stem`` and ``tail`` feed one residual sum) and one plain
    conv (``body``) whose channel :data:`DEAD_CHANNEL` is planted dead; a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 12, 3, padding=1)
        self.body_bn = nn.BatchNorm2d(12)
        self.tail = nn.Conv2d(12, 8, 3, padding=1)
        self.tail_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.relu(self.body_bn(self.body(x)))
        x = torch.relu(x + self.tail_bn(self.tail(y)))
        return self.head(x.mean((2, 3)))


def check_model() -> tuple[nn.Module, Tensor, list[tuple[Tensor, Tensor]]]:
    """The check's model (eval mode, non-trivial BN statistics, channel :data:`DEAD_CHANNEL`
    of ``body`` dead), an example input and the calibration batches; the global RNG is left
    untouched."""
    with torch.random.fork_rng(devices=[]):  # the layers' default init draws from the global RNG
        model = _CheckNet().eval()
    g = torch.Generator().manual_seed(_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.endswith("weight") else 0.1))
        for bn in (model.stem_bn, model.body_bn, model.tail_bn):
            bn.weight.add_(1.0)  # gammas around 1, as in a trained net
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        c = DEAD_CHANNEL
        # Zero filter, bias, gamma and beta: the channel is exactly 0 after BN and ReLU
        # (whatever its running statistics). Zeroing the consumer's column too leaves it no
        # weight at all, so criteria summing over the whole group (l1, l2) see it as well.
        for t in (model.body.weight[c], model.body.bias[c], model.body_bn.weight[c], model.body_bn.bias[c],
                  model.tail.weight[:, c]):
            t.zero_()
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(_BATCHES)]
    return model, torch.randn(1, 3, 8, 8, generator=g), batches


def _resolve(name_or_fn: str | Callable[..., Any]) -> tuple[str | None, Callable[..., Any]]:
    """The criterion's registered name (None for an unregistered function) and the function."""
    from prunekit.criteria import _REGISTRY, get

    if isinstance(name_or_fn, str):
        return name_or_fn, get(name_or_fn)
    name = next((n for n, fn in _REGISTRY.items() if fn is name_or_fn), None)
    return name, name_or_fn


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_criterion(name_or_fn: str | Callable[..., Any], *, data_driven: bool | None = None) -> None:
    """Assert that a criterion (a registered name or the function) conforms: see the module
    docstring for the properties. ``data_driven`` says whether it gets calibration data
    (``loader=`` and ``batches=``, as ``criterion_kwargs`` would pass them); the default is
    membership of :data:`prunekit.criteria.DATA_CRITERIA`. Raises AssertionError naming the
    criterion and the property that failed; returns None when all hold."""
    import prunekit as pk
    from prunekit.criteria import DATA_CRITERIA, score_groups

    name, fn = _resolve(name_or_fn)
    label = repr(name) if name is not None else getattr(fn, "__name__", repr(fn))
    if data_driven is None:
        data_driven = name in DATA_CRITERIA
    model, x, batches = check_model()
    graph = pk.trace(model, x)
    ctx: dict[str, Any] = {"seed": _SEED}
    if data_driven:
        ctx.update(loader=batches, batches=len(batches))

    def checked(model: nn.Module, group: Any, **kw: Any) -> np.ndarray:
        # Checked here, before score_groups converts the result, so the message names the property.
        s = np.asarray(fn(model, group, **kw), dtype=np.float64)
        if s.shape != (group.size,):
            raise AssertionError(f"criterion {label}: shape: returned {s.shape} for group '{group.name}' "
                                 f"of {group.size} channels (one score per channel expected)")
        if not np.isfinite(s).all():
            raise AssertionError(f"criterion {label}: finite: group '{group.name}' got non-finite scores {s}")
        return s

    before, training = _state(model), model.training
    first = score_groups(model, graph.groups, checked, **ctx)
    after = _state(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if changed or model.training != training:
        what = f"changed {', '.join(changed)}" if changed else f"left the model in training={model.training}"
        raise AssertionError(f"criterion {label}: side effects: scoring {what}")
    second = score_groups(model, graph.groups, checked, **ctx)
    for g, a, b in zip(graph.groups, first, second):
        if not np.array_equal(a, b):
            raise AssertionError(f"criterion {label}: determinism: group '{g.name}' scored {a} then {b} "
                                 f"with the same seed and data")
    if name in BLIND_TO_DEAD_CHANNELS:
        return
    # The group whose producer is ``body``, and the dead channel's index in it.
    (group, s, local), = [(g, scores, int(m.channel[DEAD_CHANNEL])) for g, scores in zip(graph.groups, first)
                          for m in g.members if m.tensor == "body.weight" and m.role == "out"]
    others = np.delete(s, local)
    if not s[local] < others.min():
        raise AssertionError(f"criterion {label}: dead channel: channel {DEAD_CHANNEL} of 'body' outputs exactly "
                             f"zero and is read by no weight, yet scored {s[local]:.6g} against a minimum of "
                             f"{others.min():.6g} over the other channels of group '{group.name}' (it must be the "
                             "strict lowest; a criterion blind to it by design belongs in BLIND_TO_DEAD_CHANNELS)")
