"""Module factories for :class:`prunekit.plan.Replace` steps, looked up by name.

A saved plan names a factory and its JSON arguments; loading calls the registered function,
never unpickles code. :func:`describe` gives the ``(factory, args)`` that rebuild a module
made of the built-in kinds, so ``Replace.of(name, module)`` works for any such module.

>>> from torch import nn
>>> name, args = describe(nn.Sequential(nn.Conv2d(8, 3, 3, padding=1, bias=False), nn.Conv2d(3, 16, 1)))
>>> name, [a["factory"] for a in args["modules"]]
('sequential', ['conv', 'conv'])
>>> build(name, args)[1].out_channels
16
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from prunekit.errors import PruningError
from prunekit.registry import Registry
from prunekit.surgery.mha import PrunedMultiheadAttention
from prunekit.surgery.partitioned import PartitionedLinear

Factory = Callable[..., nn.Module]
FACTORIES: Registry[Factory] = Registry("module factory")


def register_factory(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering ``fn(**json_args) -> nn.Module`` as factory ``name``."""
    return FACTORIES.register(name)


def build(name: str, args: dict[str, Any]) -> nn.Module:
    """The module factory ``name`` builds from ``args``; PruningError names an unknown
    factory or arguments it rejects."""
    try:
        fn = FACTORIES.get(name)
    except KeyError as exc:
        raise PruningError(f"plan step: {exc.args[0]}") from None
    try:
        return fn(**args)
    except TypeError as exc:
        raise PruningError(f"plan step: factory '{name}' rejects its arguments {args}: {exc}") from None


class Zero(nn.Module):
    """Outputs zeros shaped like its first input: a dropped residual branch (the sum keeps
    the shortcut). Extra positional/keyword arguments are accepted and ignored."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``torch.zeros_like(x)``."""
        return torch.zeros_like(x)


class ResidualConv(nn.Module):
    """``x + scale * norm(conv(x))``: a layer with a shortcut around it and a trainable scalar
    ``scale`` on the layer (ResConv, Xu et al. 2020). ``norm`` is optional (None: the branch is
    the conv alone). Built for training; :func:`prunekit.methods.resconv.fuse` turns it back
    into one conv. ``shortcut = False`` (a plain attribute, not saved) computes
    ``norm(conv(x))`` alone, the wrapped layers' own function, which is how a wrapping is
    checked."""

    def __init__(self, conv: nn.Module, norm: nn.Module | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.shortcut = True

    def forward(self, x: Tensor) -> Tensor:
        """``x + scale * norm(conv(x))`` (``norm(conv(x))`` when ``shortcut`` is off)."""
        y = self.conv(x)
        if self.norm is not None:
            y = self.norm(y)
        return x + self.scale * y if self.shortcut else y


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@register_factory("conv")
def conv(*, dims: int, in_channels: int, out_channels: int, kernel_size: list[int], stride: list[int] | int = 1,
         padding: list[int] | int | str = 0, dilation: list[int] | int = 1, groups: int = 1, bias: bool = True,
         padding_mode: str = "zeros") -> nn.Module:
    """``nn.Conv{dims}d`` with these options."""
    return _CONVS[dims](in_channels, out_channels, tuple(kernel_size), stride=_tup(stride), padding=_tup(padding),
                        dilation=_tup(dilation), groups=groups, bias=bias, padding_mode=padding_mode)


@register_factory("linear")
def linear(*, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """``nn.Linear``."""
    return nn.Linear(in_features, out_features, bias=bias)


@register_factory("batch_norm")
def batch_norm(*, dims: int, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
               affine: bool = True, track_running_stats: bool = True) -> nn.Module:
    """``nn.BatchNorm{dims}d``."""
    return _BNS[dims](num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)


@register_factory("identity")
def identity() -> nn.Module:
    """``nn.Identity``."""
    return nn.Identity()


@register_factory("zero")
def zero() -> nn.Module:
    """:class:`Zero`."""
    return Zero()


@register_factory("sequential")
def sequential(*, modules: list[dict[str, Any]]) -> nn.Module:
    """``nn.Sequential`` of modules given as ``{"factory": name, "args": {...}}``."""
    return nn.Sequential(*(build(m["factory"], m["args"]) for m in modules))


@register_factory("residual_conv")
def residual_conv(*, conv: dict[str, Any], norm: dict[str, Any] | None = None, scale: float = 1.0) -> nn.Module:
    """:class:`ResidualConv` around the modules given as ``{"factory": name, "args": {...}}``."""
    return ResidualConv(build(conv["factory"], conv["args"]),
                        build(norm["factory"], norm["args"]) if norm is not None else None, scale)


@register_factory("partitioned_linear")
def partitioned_linear(*, in_features: int, in_ranges: list[list[int]], out_sizes: list[int], bias: bool = True,
                       parallel: bool = True, threads: int = 1) -> nn.Module:
    """:class:`~prunekit.surgery.partitioned.PartitionedLinear` (its blocks, not their tensors)."""
    return PartitionedLinear(in_features, in_ranges, out_sizes, bias=bias, parallel=parallel, threads=threads)


@register_factory("multihead_attention")
def multihead_attention(*, embed_dim: int, num_heads: int, head_dim: int, kdim: int, vdim: int, out_dim: int,
                        bias: bool = True, add_bias_kv: bool = False, add_zero_attn: bool = False,
                        dropout: float = 0.0, batch_first: bool = False, packed: bool = True) -> nn.Module:
    """:class:`~prunekit.surgery.mha.PrunedMultiheadAttention` with these widths (its tensors
    freshly initialised)."""
    return PrunedMultiheadAttention(embed_dim, num_heads, head_dim=head_dim, kdim=kdim, vdim=vdim, out_dim=out_dim,
                                    bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, dropout=dropout,
                                    batch_first=batch_first, packed=packed)


def _tup(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def describe(module: nn.Module) -> tuple[str, dict[str, Any]]:
    """``(factory, args)`` that rebuild ``module``'s structure (not its tensors); PruningError
    for a module no built-in factory describes (register one and describe it yourself)."""
    kind = type(module)
    if kind in _CONVS.values():
        m = module
        return "conv", {"dims": len(m.kernel_size), "in_channels": m.in_channels, "out_channels": m.out_channels,
                        "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                        "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                        "padding_mode": m.padding_mode}
    if kind is nn.Linear:
        return "linear", {"in_features": module.in_features, "out_features": module.out_features,
                          "bias": module.bias is not None}
    if kind in _BNS.values():
        dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}[kind]
        return "batch_norm", {"dims": dims, "num_features": module.num_features, "eps": module.eps,
                              "momentum": module.momentum, "affine": module.affine,
                              "track_running_stats": module.track_running_stats}
    if kind is nn.Identity:
        return "identity", {}
    if kind is Zero:
        return "zero", {}
    if kind is ResidualConv:
        return "residual_conv", {"conv": dict(zip(("factory", "args"), describe(module.conv))),
                                 "norm": None if module.norm is None else
                                 dict(zip(("factory", "args"), describe(module.norm)))}
    if kind is PartitionedLinear:
        return "partitioned_linear", module.factory_args()
    if kind is PrunedMultiheadAttention:
        return "multihead_attention", module.factory_args()
    if kind is nn.Sequential:
        return "sequential", {"modules": [dict(zip(("factory", "args"), describe(m))) for m in module]}
    raise PruningError(f"no factory describes {kind.__name__}: register one with "
                       "prunekit.surgery.factories.register_factory and give Replace its name and args")
