"""Sizes read from traced tensors, and where they go.

A forward pass that reads ``C = x.shape[1]`` and then computes with it (``corr /
torch.sqrt(torch.tensor(C))``, ``x * C ** -0.5``) gives a model whose *values* change when
the channels behind ``C`` are pruned: the plan's shapes all agree, so validation cannot see
it, and the result is silently inexact. Used as a size instead (``x.reshape(B, N, C)``), the
same number is rewritten by pruning itself, which is what we want.

While tracing, a size read from a dim that carries channels is returned as a
:class:`SizeInt`: a :class:`~prunekit.graph.provenance.ShapeInt` (a size that follows the
pruned tensors by itself, which no attribute fix may touch) that also remembers the channels
it counts (:class:`SizeTag`).
Arithmetic on it keeps the tags (``C // heads`` is a :class:`SizeInt`, ``C ** -0.5`` a
:class:`SizeFloat`), so the tracer can tell, at the torch call that receives one, whether
it is used as a size (:data:`SIZE_OPS`) or as a value (anything else), and converting one to
a Python float (``float(C)``, ``math.sqrt(C)``) is reported through :data:`float_listener`.
Not seen: a tagged float passed to ``math`` functions (``math.sqrt(C / 2)``: Python reads a
float subclass's value without asking it), and numbers rebuilt with ``int()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from prunekit.graph.provenance import AttrInt, ShapeInt


@dataclass(frozen=True)
class SizeTag:
    """What one size read counts: ``rows[i]`` are the atoms at position ``i`` of the dim
    read (the tensor's compact label with that dim moved first; 0 for untracked elements),
    ``where`` says which read it was (for messages)."""

    rows: np.ndarray | None
    where: str
    param: tuple[str, int] | None = None  # (tensor, dim) for a parameter's size: no rows yet
    # For a quotient by a module attribute (``C // num_heads``): (the divisor, "floordiv" or
    # "truediv"). Its value survives a prune that shrinks both alike (whole heads and their
    # share of the embedding), so a value use is checked against the plan, not blocked.
    per: tuple[Any, str] | None = None

    @property
    def keep(self) -> np.ndarray:
        """One atom of each position that pruning could remove: keeping them fixes the count
        (a position with an untracked element always stays)."""
        full = (self.rows != 0).all(axis=1)
        return self.rows[full, 0]


Tags = tuple[SizeTag, ...]

float_listener: list[Callable[[Tags], None]] = []
"""Callbacks told when a :class:`SizeInt` is converted to a Python float outside a torch
call (the tracer installs one while it runs)."""


def tags_of(value: Any) -> Tags:
    """The tags of a traced size (empty for any other object)."""
    return getattr(value, "_pk_tags", ()) if isinstance(value, (SizeInt, SizeFloat)) else ()


def tagged(value: Any, tags: Tags) -> Any:
    """``value`` carrying ``tags``: a :class:`SizeInt`/:class:`SizeFloat` for an int/float
    (bools excepted), ``value`` itself otherwise or when there are no tags."""
    if not tags or isinstance(value, bool):
        return value
    if isinstance(value, int):
        out: Any = SizeInt(value)
    elif isinstance(value, float):
        out = SizeFloat(value)
    else:
        return value
    out._pk_tags = tags
    return out


def merge(a: Tags, b: Tags) -> Tags:
    """``a`` then the tags of ``b`` not in it (``C + C`` counts one read once)."""
    return a + tuple(t for t in b if all(t is not u for u in a))


def find_tagged(obj: Any) -> Tags:
    """Tags of every traced size inside ``obj`` (nested tuples, lists, dict values, slices)."""
    if isinstance(obj, (SizeInt, SizeFloat)):
        return tags_of(obj)
    if isinstance(obj, (tuple, list)):
        return tuple(t for o in obj for t in find_tagged(o))
    if isinstance(obj, dict):
        return tuple(t for o in obj.values() for t in find_tagged(o))
    if isinstance(obj, slice):
        return find_tagged((obj.start, obj.stop, obj.step))
    return ()


def _binary(op: Callable[[Any, Any], Any], reflected: bool = False, name: str = "") -> Callable[[Any, Any], Any]:
    def method(self: Any, other: Any) -> Any:
        if not isinstance(other, (int, float)):
            return NotImplemented  # a tensor's own operator then sees the tagged number
        out = op(_plain(other), _plain(self)) if reflected else op(_plain(self), _plain(other))
        if not reflected and name in ("floordiv", "truediv") and isinstance(other, AttrInt):
            return tagged(out, _per(tags_of(self), other, name))
        return tagged(out, merge(tags_of(self), tags_of(other)))

    return method


def _per(tags: Tags, divisor: AttrInt, how: str) -> Tags:
    """``tags`` of a size divided by module attribute ``divisor``: each a quotient tag (see
    :attr:`SizeTag.per`); a tag that is a quotient already, or counts a parameter's dim, stays
    as it is (its value use is then judged as before)."""
    return tuple(replace(t, per=(divisor, how)) if t.per is None and t.rows is not None else t for t in tags)


def quotient_kept(tag: SizeTag, gone: np.ndarray, divisor: int) -> bool:
    """Whether the quotient ``tag`` counts keeps its value when the atoms ``gone`` (bool
    over atoms) are removed and its divisor attribute becomes ``divisor``."""
    assert tag.per is not None and tag.rows is not None
    rows = tag.rows
    before, after = rows.shape[0], int((~(gone[rows] & (rows != 0)).all(axis=1)).sum())
    old = int(tag.per[0])
    if divisor == 0:
        return False
    if tag.per[1] == "floordiv":
        return after // divisor == before // old
    return after * old == before * divisor


def _plain(x: Any) -> Any:
    """``x`` as a plain int/float (without asking a :class:`SizeInt` for ``__float__``)."""
    if isinstance(x, bool) or type(x) in (int, float):
        return x
    return int.__int__(x) if isinstance(x, int) else float.__float__(x)


def _unary(op: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def method(self: Any) -> Any:
        return tagged(op(_plain(self)), tags_of(self))

    return method


_ARITH = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "truediv": lambda a, b: a / b, "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b,
    "pow": lambda a, b: a ** b,
}


def _install(cls: type) -> type:
    for name, op in _ARITH.items():
        setattr(cls, f"__{name}__", _binary(op, name=name))
        setattr(cls, f"__r{name}__", _binary(op, reflected=True))
    for name, op in (("neg", lambda a: -a), ("pos", lambda a: +a), ("abs", abs)):
        setattr(cls, f"__{name}__", _unary(op))
    return cls


@_install
class SizeInt(ShapeInt):
    """An ``int`` read from a traced tensor's shape that remembers which channels it counts
    (see the module docstring); arithmetic keeps the tags. A copy or pickle is a plain int."""

    _pk_tags: Tags = ()

    def _wrap(self, value: Any) -> Any:
        """``value``, computed from this size by other code (an attribute's arithmetic), tagged."""
        return tagged(value, self._pk_tags) if type(value) in (int, float) else value

    def __float__(self) -> float:
        for listener in float_listener:
            listener(self._pk_tags)
        return int.__float__(int.__int__(self))


@_install
class SizeFloat(float):
    """A ``float`` computed from a :class:`SizeInt` (``C ** -0.5``); arithmetic keeps the tags."""

    _pk_tags: Tags = ()

    def __round__(self, ndigits: int | None = None) -> Any:
        return tagged(round(_plain(self), ndigits), self._pk_tags)

    def __floor__(self) -> Any:
        return tagged(math.floor(_plain(self)), self._pk_tags)

    def __ceil__(self) -> Any:
        return tagged(math.ceil(_plain(self)), self._pk_tags)


SIZE_OPS = frozenset("""view reshape expand broadcast_to unflatten flatten split split_with_sizes unsafe_split chunk
unsafe_chunk tensor_split narrow getitem setitem select permute transpose swapaxes swapdims movedim moveaxis squeeze
unsqueeze repeat tile repeat_interleave roll flip zeros ones empty randn rand randint new_zeros new_ones new_empty
new_full full full_like eye tril triu diagonal interpolate upsample upsample_nearest upsample_bilinear
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d lp_pool1d lp_pool2d
max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices fractional_max_pool2d pad unfold fold topk
kthvalue layer_norm group_norm rms_norm softmax log_softmax softmin sum mean amax amin max min std var norm cumsum
cumprod logsumexp prod argmax argmin median all any index_select gather scatter scatter_add take_along_dim cat concat
concatenate stack hstack vstack unbind channel_shuffle native_channel_shuffle pixel_shuffle pixel_unshuffle conv1d
conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d view_as reshape_as expand_as contiguous
size attr.shape numel len""".split())
"""Ops whose number arguments are sizes, dims, counts or positions: a traced size there is
rewritten by pruning itself (except the value arguments of :data:`VALUE_ARGS`). Not among
them: ``arange``/``linspace`` (``torch.arange(C)`` holds channel *indices*, which pruning
renumbers)."""

VALUE_ARGS: dict[str, tuple[tuple[int, str], ...]] = {
    "full": ((1, "fill_value"),), "new_full": ((2, "fill_value"),), "full_like": ((1, "fill_value"),),
    "pad": ((3, "value"),), "setitem": ((2, "value"),),
}
"""For ops of :data:`SIZE_OPS` that also take values: (position, keyword) of those arguments."""


def value_uses(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tags:
    """Tags of the traced sizes a torch call named ``name`` uses as *values* (not sizes)."""
    if name not in SIZE_OPS:
        return find_tagged((args, kwargs))
    spec = VALUE_ARGS.get(name)
    if not spec:
        return ()
    return tuple(t for pos, key in spec
                 for t in find_tagged(args[pos] if len(args) > pos else kwargs.get(key)))
