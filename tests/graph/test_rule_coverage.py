"""Every channel rule in ``prunekit.graph.rules.RULES`` is exercised by some traced model.

The rules are wrapped in place (``RULES`` is what the tracer looks up for every op) and a
set of models is traced: the hand-built nets, torchvision and timm models at small inputs,
and small modules written for the ops those models never use. A rule function that no model
reaches (a newly registered one, or one a tracer change cut off) fails the test by name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import prunekit as pk
from prunekit.graph import rules
from prunekit.graph.rules import RULES

from nets import NETS

try:
    import timm
except ImportError:  # optional: the purpose-built modules below reach every rule without it
    timm = None

UNREACHABLE = {
    rules.passthrough_meta: "metadata queries (x.shape, x.size(), x.device, ...) return no tensor, and the "
                            "tracer applies rules only to calls with tensor outputs",
}
"""Rule functions no traced model can reach, with the reason (checked to stay unreached)."""

KNOWN_GAPS = {
    rules.setitem: "`x[idx] = y` returns None, so Tracer.handle never applies its rule and the channels "
                   "written are lost (see test_slice_assignment_carries_the_written_channels)",
}
"""Rule functions a tracer bug keeps from running: tracked by a strict xfail until fixed."""


class TokenMixer(nn.Module):
    """Embedding lookup, a product with a raw parameter matrix, constant padding, GroupNorm,
    an in-place slice assignment and a tensor made inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Parameter(torch.randn(8, 6))
        self.conv = nn.Conv2d(6, 6, 3)
        self.gn = nn.GroupNorm(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) @ self.proj  # (batch, 16, 6)
        x = F.pad(x.transpose(1, 2).reshape(-1, 6, 4, 4), (1, 1, 1, 1))
        x = self.gn(self.conv(x)).clone()
        x[:, :, 0] = 0
        x = x + torch.zeros(1, 6, 1, 1, device=x.device)
        return self.head(x.mean((2, 3)))


class MetaQueries(nn.Module):
    """Calls every metadata query :func:`rules.passthrough_meta` is registered for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, c = y.shape[:2]
        assert y.size(1) == c and y.dim() == 4 and y.ndim == 4 and y.numel() > 0
        assert y.device == x.device and y.dtype == x.dtype and y.is_cuda == x.is_cuda
        assert not y.is_nested and y.layout == torch.strided and y.grad_fn is None and not y.requires_grad
        return y.reshape(b, c, -1).mean(-1)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kw)


def _image() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    **NETS,
    "resnet18": (torchvision.models.resnet18, _image),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, _image),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32), _image),
    **({"timm_convnext_atto": (_timm("convnext_atto"), _image),
        "timm_vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32), _image),
        "timm_efficientnet_b0": (_timm("efficientnet_b0"), _image)} if timm is not None else {}),
    "token_mixer": (TokenMixer, lambda: torch.randint(0, 10, (2, 16))),
}


def _record(monkeypatch: pytest.MonkeyPatch) -> tuple[set[Callable[..., Any]], Counter[Callable[..., Any]]]:
    """Wrap every registered rule so that each call is counted under the original function;
    returns the distinct original functions and the counter."""
    originals = set(RULES.values())
    calls: Counter[Callable[..., Any]] = Counter()

    def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[fn] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in list(RULES.items()):
        monkeypatch.setitem(RULES, name, counting(fn))
    return originals, calls


def _trace(build: Callable[[], nn.Module], inputs: Callable[[], Any]) -> None:
    torch.manual_seed(0)
    pk.trace(build().eval(), inputs())


def test_every_rule_function_is_exercised(monkeypatch: pytest.MonkeyPatch) -> None:
    originals, calls = _record(monkeypatch)
    for build, inputs in MODELS.values():
        _trace(build, inputs)
    missing = sorted(fn.__name__ for fn in originals - set(calls) - set(UNREACHABLE) - set(KNOWN_GAPS))
    assert not missing, f"rule functions no traced model exercised: {', '.join(missing)}"


def test_unreachable_rules_stay_unreached(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the tracer ever hands metadata queries to their rule, this fails and the entry in
    UNREACHABLE must go (the coverage test then asks for a model that reaches it)."""
    originals, calls = _record(monkeypatch)
    assert set(UNREACHABLE) <= originals
    _trace(MetaQueries, _image)
    assert calls, "the wrapped rules were not called at all: the recording is broken"
    assert not set(calls) & set(UNREACHABLE)


class SliceAssign(nn.Module):
    """``b``'s output overwrites the first two channels of ``a``'s: ``c`` reads b there."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).clone()
        y[:, :2] = self.b(x)
        return self.c(y)


@pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[rules.setitem])
def test_slice_assignment_carries_the_written_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Oracle: channel i < 2 of c's input is b's channel i, so b's group holds c's input
    slices. Today b looks unconsumed, and pruning it 2 -> 1 broadcasts its one channel over
    both slots. When this passes, drop setitem from KNOWN_GAPS."""
    originals, calls = _record(monkeypatch)
    graph = pk.trace(SliceAssign().eval(), _image())
    (b_group,) = graph.groups_of("b")
    assert calls[rules.setitem]
    assert [m.channel.tolist() for m in b_group.members if m.tensor == "c.weight" and m.role == "in"] == \
        [[0, 1, -1, -1]]
