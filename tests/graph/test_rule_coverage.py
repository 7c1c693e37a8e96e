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
from prunekit.surgery.reference import masked_reference

from nets import NETS

try:
    import timm
except ImportError:  # optional: the purpose-built modules below reach every rule without it
    timm = None

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
    """Queries every kind of tensor metadata: none of them returns a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, c = y.shape[:2]
        assert y.size(1) == c and y.dim() == 4 and y.ndim == 4 and y.numel() > 0
        assert y.device == x.device and y.dtype == x.dtype and y.is_cuda == x.is_cuda
        assert not y.is_nested and y.layout == torch.strided and y.grad_fn is None and not y.requires_grad
        return self.fc(y.reshape(b, c, -1).mean(-1))


class RoIHead(nn.Module):
    """Features pooled over fixed boxes by RoI Align (the Fast R-CNN pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]], device=x.device)
        return self.fc(torchvision.ops.roi_align(self.conv(x), rois, (2, 2)).flatten(1))


class ChannelSoftmax(nn.Module):
    """A softmax over channels and an L2 normalisation over channels (SSD's L2Norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(self.conv(x).softmax(dim=1), dim=1)
        return self.fc(y.mean((2, 3)))


class Products(nn.Module):
    """``addmm`` with a parameter weight (HF's Conv1D), ``baddbmm``, ``einsum``, and ``F.unfold``
    followed by ``F.fold``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6))
        self.b = nn.Parameter(torch.zeros(6))
        self.mix = nn.Parameter(torch.randn(4, 6))
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, 3, 4, 4)
        rows = x.flatten(2).transpose(1, 2)[0]  # (16, 3)
        y = torch.addmm(self.b, rows, self.w)  # (16, 6)
        y = torch.baddbmm(y[None], y[None], torch.eye(6, device=x.device)[None])  # (1, 16, 6)
        y = torch.einsum("bnc,dc->bdn", y, self.mix).reshape(1, 4, 4, 4)
        cols = F.unfold(self.conv(y), 3, padding=1)
        return F.fold(cols, (4, 4), 3, padding=1)


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
    "roi_head": (RoIHead, lambda: torch.randn(1, 3, 8, 8)),
    "channel_softmax": (ChannelSoftmax, lambda: torch.randn(1, 3, 4, 4)),
    "products": (Products, lambda: torch.randn(1, 3, 4, 4)),
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
    missing = sorted(fn.__name__ for fn in originals - set(calls))
    assert not missing, f"rule functions no traced model exercised: {', '.join(missing)}"


def test_metadata_queries_are_not_ops() -> None:
    """Metadata queries return no tensor: the tracer records no op for them, so they never
    reach the blocking fallback for ops without a rule (which would freeze conv's channels)."""
    graph = pk.trace(MetaQueries().eval(), _image())
    assert [op.name for op in graph.ops("eval")] == ["conv2d", "reshape", "mean", "linear"]
    (group,) = graph.groups_of("conv")
    assert group.prunable.all()


class SliceAssign(nn.Module):
    """``b``'s output overwrites the first two channels of ``a``'s: ``c`` reads b there."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).clone()
        y[:, :2] = self.b(x)
        return self.c(y)


def test_slice_assignment_carries_the_written_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Oracle: channel i < 2 of c's input is b's channel i, so b's group holds c's input
    slices, and a's channels 0 and 1, overwritten at positions the code fixes, are blocked."""
    originals, calls = _record(monkeypatch)
    graph = pk.trace(SliceAssign().eval(), _image())
    (b_group,) = graph.groups_of("b")
    (a_group,) = graph.groups_of("a")
    assert calls[rules.setitem]
    assert [m.channel.tolist() for m in b_group.members if m.tensor == "c.weight" and m.role == "in"] == \
        [[0, 1, -1, -1]]
    assert a_group.prunable.tolist() == [False, False, True, True]
    assert "overwrites" in a_group.reasons[0]


@pytest.mark.parametrize("ignore_b", [False, True])
def test_slice_assignment_is_pruned_exactly(ignore_b: bool) -> None:
    """The pruned model equals the masked original. Pruning b would leave its slot of two
    channels to a broadcast (validation refuses it); with b kept, a loses its two live
    channels and c the matching inputs."""
    torch.manual_seed(0)
    model, x = SliceAssign().eval(), _image()
    graph = pk.trace(model, x, ignore=[model.b] if ignore_b else None)
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert small.b.out_channels == 2
    if ignore_b:
        assert not plan.meta["repairs"]
        assert (small.a.out_channels, small.c.in_channels) == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_reference(model, graph, plan)(x), rtol=0, atol=1e-6)


class ConstantWrite(nn.Module):
    """Writes zeros into ``a``'s output: by a mask computed from it, along a spatial dim, or
    into its first two channels."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).clone()
        if self.where == "mask":
            y[y < 0] = 0
        elif self.where == "rows":
            y[:, :, 0] = 0
        else:
            y[:, :2] = 0
        return self.c(y)


@pytest.mark.parametrize("where,prunable", [("mask", [True] * 4), ("rows", [True] * 4),
                                            ("channels", [False, False, True, True])])
def test_constant_writes_keep_channels_unless_they_pick_them(where: str, prunable: list[bool]) -> None:
    """Oracle: a constant written alike into every channel moves with the channels when they
    are pruned; ``y[:, :2] = 0`` zeroes whichever channels end up first, so a's first two
    stay. The pruned model equals the masked original either way."""
    torch.manual_seed(0)
    model, x = ConstantWrite(where).eval(), _image()
    graph = pk.trace(model, x)
    (group,) = graph.groups_of("a")
    assert group.prunable.tolist() == prunable
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert small.a.out_channels == 2 and not plan.meta["repairs"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_reference(model, graph, plan)(x), rtol=0, atol=1e-6)
