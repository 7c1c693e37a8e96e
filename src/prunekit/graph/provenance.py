"""Where the sizes a traced forward passes to its ops come from: a module attribute or a tensor.

Pruning changes some sizes an op is called with (``x.view(b, n, self.num_heads, d)``). When
such a size is a module attribute, the attribute must be rewritten; when it was read from a
tensor (``x.shape[1]``), it follows the pruned tensors by itself and nothing may be
rewritten. To know which is which, while a model is traced:

* every ``int`` attribute of every module (and every ``int`` inside a list or tuple
  attribute) is swapped for an :class:`AttrInt` that remembers the module and attribute
  (and the position in the sequence), restored when the pass ends;
* every size the forward reads from a tensor (``x.shape``, ``x.size(1)``, ``x.numel()``,
  ``len(x)``) along a dim pruning may change (one its channels vary along) is a
  :class:`ShapeInt` (the tracer returns a :class:`prunekit.graph.sizes.SizeInt`, which also
  names those channels); the other dims' sizes (batch, tokens) are constants like literals.

Both are ``int`` subclasses, so the model computes exactly what it would with plain ints.
Arithmetic keeps the mark where the result is still an exact function of one attribute: an
attribute ``*``, ``//``, ``+`` or ``-`` a constant (a literal, or another attribute, taken as
fixed) stays an :class:`AttrInt` of the first attribute, with the step recorded so that a
new value can be solved back (:meth:`AttrInt.solve`). A product of two attributes is
ambiguous (which one changed?) and a constant minus or divided by an attribute is not an
attribute's size: both become plain ints. Anything computed with a :class:`ShapeInt` is a
:class:`ShapeInt`: ``num_kv_heads * self.num_key_value_groups`` with the first read from a
shape names no attribute, so ``num_key_value_groups`` is never rewritten because its value
happened to be a pruned count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["AttrInt", "ShapeInt", "mark_attributes"]


class ShapeInt(int):
    """An int read from a tensor's shape along a dim pruning may change (or computed from
    one): it follows the pruned tensors by itself and names no attribute."""

    def __reduce__(self) -> tuple[Any, ...]:
        return int, (int(self),)  # a copy or pickle of a model that kept one holds a plain int

    def _wrap(self, value: Any) -> Any:
        """``value``, computed from this size, as a size of the same kind."""
        return ShapeInt(value) if type(value) is int else value

    def __add__(self, other: Any) -> Any:
        return self._wrap(int.__add__(self, other))

    def __radd__(self, other: Any) -> Any:
        return self._wrap(int.__radd__(self, other))

    def __sub__(self, other: Any) -> Any:
        return self._wrap(int.__sub__(self, other))

    def __rsub__(self, other: Any) -> Any:
        return self._wrap(int.__rsub__(self, other))

    def __mul__(self, other: Any) -> Any:
        return self._wrap(int.__mul__(self, other))

    def __rmul__(self, other: Any) -> Any:
        return self._wrap(int.__rmul__(self, other))

    def __floordiv__(self, other: Any) -> Any:
        return self._wrap(int.__floordiv__(self, other))

    def __rfloordiv__(self, other: Any) -> Any:
        return self._wrap(int.__rfloordiv__(self, other))

    def __mod__(self, other: Any) -> Any:
        return self._wrap(int.__mod__(self, other))

    def __rmod__(self, other: Any) -> Any:
        return self._wrap(int.__rmod__(self, other))

    def __neg__(self) -> Any:
        return ShapeInt(-int(self))


class AttrInt(int):
    """An int that is module attribute ``attr`` of module ``module`` (a qualified name; ``index``:
    the position inside a list/tuple attribute, else None), after the arithmetic ``steps``
    (``("mul" | "floordiv" | "add", constant)``, in order)."""

    module: str
    attr: str
    index: int | None
    steps: tuple[tuple[str, int], ...]

    def __new__(cls, value: int, module: str, attr: str, index: int | None = None,
                steps: tuple[tuple[str, int], ...] = ()) -> "AttrInt":
        obj = super().__new__(cls, value)
        obj.module, obj.attr, obj.index, obj.steps = module, attr, index, steps
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return int, (int(self),)

    def solve(self, value: int) -> int | None:
        """The attribute value for which this expression equals ``value``; None where no
        integer does (``2 * attr`` cannot be 5)."""
        for op, k in reversed(self.steps):
            if op == "add":
                value -= k
            elif op == "mul":
                if k == 0 or value % k:
                    return None
                value //= k
            else:  # floordiv: the smallest attribute giving ``value`` (exact for a multiple of k)
                value *= k
        return int(value)

    def evaluate(self, attr_value: int) -> int:
        """This expression's value when the attribute is ``attr_value`` (the inverse of
        :meth:`solve`)."""
        value = int(attr_value)
        for op, k in self.steps:
            value = value + k if op == "add" else value * k if op == "mul" else value // k
        return value

    def _then(self, op: str, other: Any, value: Any) -> Any:
        if isinstance(other, ShapeInt):
            return other._wrap(value)  # a ShapeInt subclass (graph.sizes.SizeInt) keeps what it carries
        if type(value) is not int or isinstance(other, bool) or not isinstance(other, int):
            return value  # a float, or an operand of another kind: no size of this attribute
        return AttrInt(value, self.module, self.attr, self.index, self.steps + ((op, int(other)),))

    def __add__(self, other: Any) -> Any:
        return self._then("add", other, int.__add__(self, other))

    __radd__ = __add__

    def __sub__(self, other: Any) -> Any:
        value = int.__sub__(self, other)
        return self._then("add", -other if isinstance(other, int) else other, value)

    def __rsub__(self, other: Any) -> Any:
        value = int.__rsub__(self, other)
        return other._wrap(value) if isinstance(other, ShapeInt) else value

    def __mul__(self, other: Any) -> Any:
        value = int.__mul__(self, other)
        if isinstance(other, AttrInt):
            return value if type(value) is not int else int(value)  # ambiguous: which attribute changed?
        return self._then("mul", other, value)

    __rmul__ = __mul__

    def __floordiv__(self, other: Any) -> Any:
        return self._then("floordiv", other, int.__floordiv__(self, other))

    def __rfloordiv__(self, other: Any) -> Any:
        value = int.__rfloordiv__(self, other)
        return other._wrap(value) if isinstance(other, ShapeInt) else value

    def __truediv__(self, other: Any) -> Any:
        value = int.__truediv__(self, other)
        return other._wrap(value) if isinstance(other, ShapeInt) else value

    def __pow__(self, other: Any, mod: Any = None) -> Any:
        value = int.__pow__(self, other, mod)
        return other._wrap(value) if isinstance(other, ShapeInt) else value


def _marked(value: Any, module: str, attr: str) -> Any:
    if type(value) is int:
        return AttrInt(value, module, attr)
    if type(value) in (list, tuple) and 0 < len(value) <= 16 and all(type(v) is int for v in value):
        return type(value)(AttrInt(v, module, attr, i) for i, v in enumerate(value))
    return None


@contextmanager
def mark_attributes(named_modules: dict[int, str], modules: list[nn.Module]) -> Iterator[None]:
    """Within the block, the int attributes (and int list/tuple attributes) of ``modules`` are
    :class:`AttrInt` naming their module (``named_modules``: id -> qualified name) and
    attribute; afterwards the originals are back, and an attribute the forward set to a
    marked value (or a list, tuple or ``torch.Size`` of them) holds plain ints."""
    swapped: list[tuple[nn.Module, str, Any, Any]] = []
    for mod in modules:
        name = named_modules.get(id(mod))
        if name is None or isinstance(mod, torch.jit.ScriptModule):  # scripted code keeps its own types
            continue
        d = mod.__dict__
        for key, value in list(d.items()):
            if key.startswith("_"):
                continue
            marked = _marked(value, name, key)
            if marked is not None:
                d[key] = marked
                swapped.append((mod, key, value, marked))
    try:
        yield
    finally:
        for mod, key, original, marked in swapped:
            if mod.__dict__.get(key) is marked:
                mod.__dict__[key] = original
        for mod in modules:  # what the forward stored (a cached shape) holds plain ints again
            d = mod.__dict__
            for key, value in list(d.items()):
                if isinstance(value, (AttrInt, ShapeInt)):
                    d[key] = int(value)
                elif type(value) in (list, tuple, torch.Size) and any(isinstance(v, (AttrInt, ShapeInt)) for v in value):
                    d[key] = type(value)(int(v) if isinstance(v, int) else v for v in value)
