"""Layer handlers: one place per layer kind that knows its channels, sizes, cost and surgery.

A :class:`LayerHandler` answers, for the module types in its ``kinds``: which dim of the
layer's input/output holds its channels, which dims of its weight hold the output/input
channels, how to make its size attributes (``out_channels``, ``num_features``...) agree with
sliced tensors, its FLOPs and parameter count, how to slice it and how to factorise it into
a low-rank pair. Criteria, surgery and measurement ask :func:`handler_for` instead of testing
``isinstance`` against ``nn.Conv2d``, ``nn.Linear``...

Built-in handlers cover convolutions (1/2/3-D, grouped, depthwise, transposed), linear
layers, normalisations (batch/instance/group/layer norm, ``nn.RMSNorm``), embeddings, PReLU
and ``nn.MultiheadAttention``. A subclass of a handled type gets its base's handler:

>>> import torch
>>> from torch import nn
>>> from prunekit.handlers import LayerHandler, handler_for, register_handler, slice_tensors
>>> class ScaledLinear(nn.Linear):
...     pass
>>> type(handler_for(ScaledLinear(4, 3))).__name__
'LinearHandler'

Custom layers
-------------
A layer of your own gets a handler by subclassing :class:`LayerHandler`, naming the module
types in ``kinds`` and overriding what applies; :func:`register_handler` (also a class
decorator) makes :func:`handler_for` return it for those types and their subclasses:

>>> class Affine(nn.Module):
...     '''Per-channel ``y = a * x + b`` on dim 1.'''
...     def __init__(self, channels: int) -> None:
...         super().__init__()
...         self.channels = channels
...         self.weight = nn.Parameter(torch.ones(channels))
...         self.bias = nn.Parameter(torch.zeros(channels))
...     def forward(self, x):
...         shape = (1, -1) + (1,) * (x.ndim - 2)
...         return x * self.weight.view(shape) + self.bias.view(shape)
>>> @register_handler
... class AffineHandler(LayerHandler):
...     kinds = (Affine,)
...     def out_channel_dim(self, module, ndim):
...         return 1
...     def in_channel_dim(self, module, ndim):
...         return 1
...     def weight_dims(self, module):
...         return 0, None
...     def fix_attrs(self, module, put, previous):
...         put(module, "channels", module.weight.shape[0])
...     def slice(self, module, dim_kind, keep):
...         slice_tensors(module, {"weight": 0, "bias": 0}, keep)
...         self.fix_attrs(module, setattr, None)
>>> layer = Affine(4)
>>> isinstance(handler_for(layer), AffineHandler)
True
>>> handler_for(layer).slice(layer, "out", torch.tensor([0, 2]))
>>> layer.channels, tuple(layer.weight.shape)
(2, (2,))
>>> handler_for(layer).params(layer)
4
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["LayerHandler", "handler_for", "list_handlers", "low_rank_pair", "register_handler", "slice_tensors"]

Put = Callable[[nn.Module, str, Any], None]
"""How :meth:`LayerHandler.fix_attrs` sets an attribute: ``put(module, name, value)``."""


class LayerHandler:
    """What prunekit needs to know about one kind of layer; subclasses override what applies.

    The defaults describe a layer with no channels of its own: no channel dims, nothing to
    fix, 0 FLOPs, its parameters' total size, no slicing and no factorisation.
    """

    kinds: tuple[type[nn.Module], ...] = ()
    """Module types handled (their subclasses match too)."""
    is_norm: bool = False
    """A per-channel normalisation (BN/GN/LN/IN): a scale applied before it is not undone."""
    has_filters: bool = False
    """Its weight holds one filter per output channel (conv, linear): what filter-based
    criteria and analyses read."""

    def out_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """Dim of the module's ``ndim``-D output that holds its output channels; None if it
        has no per-channel output."""
        return None

    def in_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """Dim of the module's ``ndim``-D input that holds the channels it consumes; None if
        it reads no channels (e.g. the indices of an embedding)."""
        return None

    def weight_dims(self, module: nn.Module) -> tuple[int | None, int | None]:
        """``(out dim, in dim)`` of ``module.weight``: the dims indexed by output and input
        channels (None where no dim is, e.g. the input side of a depthwise conv)."""
        return None, None

    def snapshot_attrs(self, module: nn.Module) -> dict[str, Any]:
        """What :meth:`fix_attrs` needs to know from before slicing (e.g. whether a conv was
        depthwise); ``{}`` by default."""
        return {}

    def fix_attrs(self, module: nn.Module, put: Put, previous: dict[str, Any] | None) -> None:
        """Make the module's size attributes agree with its (sliced) tensors, setting each
        through ``put(module, name, value)``; ``previous`` is :meth:`snapshot_attrs` taken
        before slicing (None: take the current attributes)."""

    def replacement(self, module: nn.Module) -> nn.Module | None:
        """A module computing exactly what ``module`` computes with its current (sliced)
        tensors, to be put in its place when ``module``'s own class cannot run them (the
        widths pruning left break a contract of the class); None when it can. It must hold
        the same tensors under the same names (its state dict is ``module``'s), since surgery
        adds a :class:`~prunekit.plan.Replace` step that ``keeps_tensors``; its class needs a
        registered factory (:mod:`prunekit.surgery.factories`). None by default."""
        return None

    def flops(self, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        """FLOPs of one forward on an input of ``input_shape`` giving ``output_shape``, counted
        like ``torch.utils.flop_counter`` (2 per multiply-add of matmul/conv-like ops;
        element-wise ops, biases and normalisation 0). 0 by default."""
        return 0

    def params(self, module: nn.Module) -> int:
        """Number of parameter entries of the module (and its submodules), shared ones once."""
        return sum(p.numel() for p in module.parameters())

    def slice(self, module: nn.Module, dim_kind: str, keep: Tensor) -> None:
        """Keep only the ``keep`` indices of the module's ``"out"`` or ``"in"`` channels, in
        place: tensors and size attributes. For layers the tracer cannot see into; raises
        NotImplementedError unless a subclass implements it."""
        raise NotImplementedError(f"{type(self).__name__} cannot slice {type(module).__name__}")

    def factorise(self, module: nn.Module, rank: int, *, kind: str = "channel") -> nn.Module | None:
        """A low-rank replacement computing approximately the module's function (exactly at
        full rank), or None if the layer cannot be factorised. None by default."""
        return None

    def rank_matrix(self, module: nn.Module, kind: str = "channel") -> Tensor | None:
        """The 2-D matrix whose SVD :meth:`factorise` with this ``kind`` truncates (a reshaped
        view of the weight: its rank is the rank of the factorisation), or None if the layer
        has no such factorisation. None by default."""
        return None

    def weight_from_rank_matrix(self, module: nn.Module, matrix: Tensor, kind: str = "channel") -> Tensor:
        """The inverse reshape of :meth:`rank_matrix`: ``matrix`` (of its shape) as a tensor of
        the weight's shape, so a low-rank approximation or a gradient computed on the matrix
        can be written back. Only where :meth:`rank_matrix` is not None."""
        raise NotImplementedError(f"{type(self).__name__} has no rank matrix for {type(module).__name__}")

    def unfolds(self, module: nn.Module) -> bool:
        """Whether the output is ``weight.flatten(1) @ row + bias`` for every row of
        :meth:`unfold_input`: the layers least squares can rewrite. False by default."""
        return False

    def unfold_input(self, module: nn.Module, x: Tensor) -> Tensor:
        """The module's input ``x`` as rows of receptive fields, ``(positions, in_features)``,
        with features ordered like ``weight.flatten(1)``; only where :meth:`unfolds`."""
        raise NotImplementedError(f"{type(self).__name__} cannot unfold the input of {type(module).__name__}")

    def widths(self, module: nn.Module) -> tuple[int, int] | None:
        """``(input channels, output channels)`` as its size attributes say; None if the layer
        has no such pair."""
        return None

    def identity_weight(self, module: nn.Module) -> Tensor | None:
        """A tensor shaped like ``module.weight`` with which the layer (bias zero) returns its
        input unchanged, or None when no weight can (the layer changes the shape, or no tap of
        its kernel reads exactly the output's own position). What fusing a shortcut into the
        layer adds to its weight (ResConv, RepVGG). None by default."""
        return None

    def eval_affine(self, module: nn.Module) -> tuple[Tensor, Tensor] | None:
        """``(scale, shift)``, one entry per channel, when the layer in eval mode computes
        ``x * scale + shift`` along its channel dim (a batch norm with running statistics):
        what folds into the layer before it. None when it does not (the default: also norms
        that use the statistics of their input)."""
        return None

    def absorb_input_scale(self, module: nn.Module, scale: Tensor) -> bool:
        """Change the layer so that, in eval mode and in train mode, it computes on ``x`` what
        it computed on ``x * scale`` (``scale`` > 0, one entry per input channel), without
        touching the layer before it; True when done. False (the default, nothing changed)
        where the layer cannot (it mixes channels before normalising, or has no statistics)."""
        return False

    def resized(self, module: nn.Module, in_fraction: float, out_fraction: float) -> nn.Module | None:
        """A fresh, untrained layer configured like ``module`` with its input/output widths
        scaled by the fractions (rounded, at least one channel per group): what a latency
        table times. None if the handler cannot rebuild the layer."""
        return None

    def _slice_by_dims(self, module: nn.Module, dims: Mapping[str, int], keep: Tensor) -> None:
        """Slice the named tensors along their dims, then fix attributes (for :meth:`slice`)."""
        previous = self.snapshot_attrs(module)
        slice_tensors(module, dims, keep)
        self.fix_attrs(module, setattr, previous)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(k.__name__ for k in self.kinds)})"


def slice_tensors(module: nn.Module, dims: Mapping[str, int], keep: Tensor) -> None:
    """Replace each named parameter/buffer of ``module`` (missing or None ones are skipped)
    by its ``keep`` indices along the given dim; parameters stay parameters."""
    for name, dim in dims.items():
        t = getattr(module, name, None)
        if not isinstance(t, Tensor):
            continue
        new = t.detach().index_select(dim, keep.to(t.device).long()).clone()
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            module._buffers[name] = new


def low_rank_pair(first: nn.Module, second: nn.Module, first_weight: Tensor, second_weight: Tensor,
                  bias: Tensor | None) -> nn.Sequential:
    """``nn.Sequential(first, second)`` with the factor weights copied in and the original
    layer's ``bias`` (if any) on ``second``: the tail every :meth:`LayerHandler.factorise` shares."""
    with torch.no_grad():
        first.weight.copy_(first_weight)
        second.weight.copy_(second_weight)
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second)


def svd_factors(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``A @ B`` the best rank-``rank`` approximation of the 2-D ``matrix``
    (exact when ``rank`` reaches its smaller side, to which larger ranks are clipped):
    ``A = U_r sqrt(S_r)`` and ``B = sqrt(S_r) V_r^T`` from its SVD, computed in float64 and
    returned in ``matrix``'s dtype. The square root is shared so both factors have similar
    scale."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    u, s, vt = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    return (u[:, :r] * root).to(matrix.dtype), (root[:, None] * vt[:r]).to(matrix.dtype)


_REGISTRY: dict[type[nn.Module], LayerHandler] = {}

H = TypeVar("H", LayerHandler, type[LayerHandler])


def register_handler(handler: H) -> H:
    """Register a handler (an instance, or a class, which is instantiated: usable as a class
    decorator) for each type in its ``kinds``; it replaces an earlier handler of the same
    type, and a handler of a more specific type wins over one of its base types. Returns
    ``handler`` unchanged."""
    instance = handler() if isinstance(handler, type) else handler
    if not instance.kinds:
        raise ValueError(f"{type(instance).__name__} names no module types in 'kinds'")
    for kind in instance.kinds:
        _REGISTRY[kind] = instance
    return handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler registered for the most specific type of ``module`` (walking its MRO), or
    None if no type of it has one."""
    for cls in type(module).__mro__:
        found = _REGISTRY.get(cls)
        if found is not None:
            return found
    return None


def list_handlers() -> list[LayerHandler]:
    """Every registered handler still in use for some type, in the order their types were
    first registered."""
    return list(dict.fromkeys(_REGISTRY.values()))


# The built-in handlers register themselves on import.
from prunekit.handlers import attention, conv, embedding, linear, norm, prelu  # noqa: E402,F401
