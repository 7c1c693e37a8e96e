"""The channel rule of ``torch.einsum``, derived from the equation's subscripts.

An einsum is evaluated like torch evaluates it: letters only one operand has and nothing
later needs are summed out first (a reduction: channels along them are consumed), then
the operands are contracted pairwise, left to right. In each pair a letter is

* a *batch* letter (both operands, still needed): slice ``i`` of one operand pairs with
  slice ``i`` of the other; where channels vary along batch letters (attention heads), all
  atoms of one slice go together, as for a batched matmul;
* *contracted* (both operands, not needed later): the two operands' channels along it are
  tied index by index, as in ``a @ b``; an operand whose channels do not vary along it
  needs no tie there (its channels live on its other letters);
* *kept* by one operand only: the output carries that operand's channels along it.

A parameter operand whose letters are the contracted ones plus one output letter is a
linear layer (``"bnc,dc->bnd"``): its output letter gets new channels, its contracted
letter is sliced with the other operand's channels. Raw parameter elements that no
produced channel has joined (a relative-position table shared by all heads) neither force
a tie nor a block: they are a tensor of fixed size, as they would be for a constant.
Equations torch accepts but this rule does not model (a letter repeated within one
operand, the sublist form) block the channels they touch, like any op without a rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prunekit.graph.labels import align, compact
from prunekit.graph.rules import _unknown, product_sides, register_rule
from prunekit.graph.tracer import Tracer

__all__ = ["parse_equation"]


def parse_equation(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]] | None:
    """``(letters of each operand, letters of the output)`` of an einsum ``equation`` for
    operands of ``ndims`` dims, with ``...`` expanded into placeholder letters (right-aligned,
    as torch broadcasts them) and an implicit output (no ``->``) made explicit; None for an
    equation this rule does not model (a letter repeated within one operand)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims) or any(t.count("...") > 1 for t in terms + [rhs]):
        return None
    ellipsis = [nd - (len(t) - 3) if "..." in t else 0 for t, nd in zip(terms, ndims)]
    if any(k < 0 for k in ellipsis) or any("..." not in t and len(t) != nd for t, nd in zip(terms, ndims)):
        return None
    width = max(ellipsis, default=0)
    dots = [chr(0x100 + i) for i in range(width)]  # code points no subscript can be

    def expand(term: str, k: int) -> list[str]:
        if "..." not in term:
            return list(term)
        pre, post = term.split("...")
        return list(pre) + dots[width - k:] + list(post)

    letters = [expand(t, k) for t, k in zip(terms, ellipsis)]
    if any(len(set(ls)) != len(ls) for ls in letters):
        return None
    if arrow:
        output = expand(rhs, width)
    else:
        counts: dict[str, int] = {}
        for ls in letters:
            for ch in ls:
                if ch not in dots:
                    counts[ch] = counts.get(ch, 0) + 1
        output = dots + sorted(ch for ch, n in counts.items() if n == 1)
    seen = {ch for ls in letters for ch in ls}
    if len(set(output)) != len(output) or not set(output) <= seen:
        return None
    return letters, output


@dataclass
class _Operand:
    """An operand of the contraction so far: its letters, its label (one dim per letter) and,
    for an untouched parameter operand, the parameter (None otherwise)."""

    letters: list[str]
    lab: Tensor
    param: Tensor | None = None

    def varies(self, letter: str) -> bool:
        return letter in self.letters and self.lab.shape[self.letters.index(letter)] > 1


@register_rule("einsum")
def einsum(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
           ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """``torch.einsum``: channels follow the subscripts (see the module docstring)."""
    equation = args[0] if args else kwargs.get("equation")
    operands = list(args[1:]) if len(args) > 1 else list(kwargs.get("operands", ()))
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or not operands or not all(isinstance(t, Tensor) for t in operands):
        return _unknown(tr, name, ins, outs)
    parsed = parse_equation(equation, [t.ndim for t in operands])
    if parsed is None:
        return _unknown(tr, name, ins, outs)
    letters, output = parsed
    sizes: dict[str, int] = {}
    for t, ls in zip(operands, letters):
        for ch, n in zip(ls, t.shape):
            sizes[ch] = max(sizes.get(ch, 1), n)
    items = [_Operand(ls, align(tr.lab(t), t.ndim), t if tr.name_of(t) is not None else None)
             for t, ls in zip(operands, letters)]
    while len(items) > 1:
        later = set(output).union(*(op.letters for op in items[2:]))
        a, b = items[0], items[1]
        a, b = _reduce(tr, name, a, later | set(b.letters)), _reduce(tr, name, b, later | set(a.letters))
        items = [_pair(tr, name, a, b, later, sizes)] + items[2:]
    last = _reduce(tr, name, items[0], set(output))
    lab = last.lab.permute([last.letters.index(ch) for ch in output]) if output else last.lab
    return [compact(lab.contiguous())]


def _reduce(tr: Tracer, name: str, op: _Operand, keep: set[str]) -> _Operand:
    """``op`` summed over its letters not in ``keep``: channels varying along them are
    consumed (blocked if they also vary along a kept letter, as any reduction)."""
    gone = [i for i, ch in enumerate(op.letters) if ch not in keep]
    if not gone:
        return op
    kept = [ch for ch in op.letters if ch in keep]
    lab = op.lab
    if any(lab.shape[i] > 1 for i in gone):
        if any(lab.shape[i] > 1 for i, ch in enumerate(op.letters) if ch in keep):
            tr.block(lab, f"'einsum' in module '{tr.current}' sums over channels that vary with other subscripts")
        return _Operand(kept, torch.zeros((1,) * len(kept), dtype=torch.long))
    return _Operand(kept, lab.reshape([n for i, n in enumerate(lab.shape) if i not in gone]))


def _pair(tr: Tracer, name: str, a: _Operand, b: _Operand, later: set[str], sizes: dict[str, int]) -> _Operand:
    """The contraction of ``a`` and ``b`` (letters: batch, then a's, then b's kept ones)."""
    common = [ch for ch in a.letters if ch in b.letters]
    batch = [ch for ch in common if ch in later]
    contracted = [ch for ch in common if ch not in later]
    left = [ch for ch in a.letters if ch not in b.letters]
    right = [ch for ch in b.letters if ch not in a.letters]
    letters = batch + left + right
    for p, x, outer in ((b, a, right), (a, b, left)):
        linear = _as_linear(tr, name, p, x, batch, contracted, outer, letters, sizes)
        if linear is not None:
            return _Operand(letters, linear)
    if any(_carries(tr, a, b, ch) or _carries(tr, b, a, ch) for ch in batch):
        # Channels along batch letters (heads): slice i of a goes with slice i of b.
        reps = [_slice_reps(tr, op, batch, sizes) for op in (a, b)]
        ra, rb = torch.broadcast_tensors(*reps)
        tr.union(ra, rb)
        rep = torch.where(ra != 0, ra, rb)
        return _Operand(letters, rep.reshape(list(rep.shape) + [1] * (len(letters) - len(batch))))
    for ch in contracted:
        _tie_contracted(tr, name, a, b, ch, sizes[ch])
    rows = _kept(tr, a, left)
    cols = _kept(tr, b, right)
    sides = product_sides(tr, name, rows, cols)
    if sides is None:
        return _Operand(letters, torch.zeros((1,) * len(letters), dtype=torch.long))
    rows, cols = sides
    lab = rows.reshape([1] * len(batch) + list(rows.shape) + [1] * len(right)) if bool((rows != 0).any()) else \
        cols.reshape([1] * (len(batch) + len(left)) + list(cols.shape))
    return _Operand(letters, lab)


def _as_linear(tr: Tracer, name: str, p: _Operand, x: _Operand, batch: list[str], contracted: list[str],
               outer: list[str], letters: list[str], sizes: dict[str, int]) -> Tensor | None:
    """The label of ``p @ x`` when ``p`` is a parameter acting as a linear layer on ``x``:
    no batch letters, ``p``'s letters the contracted ones plus one output letter, and ``x``
    with channels along at most one contracted letter (as many entries as ``p`` has there)
    and none along the letters it keeps; None otherwise."""
    if p.param is None or batch or len(outer) != 1 or sorted(p.letters) != sorted(contracted + outer):
        return None
    varying = [ch for ch in contracted if x.varies(ch)]
    if len(varying) > 1 or any(x.varies(ch) for ch in x.letters if ch not in contracted):
        return None
    if varying and x.lab.shape[x.letters.index(varying[0])] != p.param.shape[p.letters.index(varying[0])]:
        return None
    if not varying and bool((x.lab != 0).any()):
        return None  # channels spread over every contracted entry: not a linear layer's inputs
    if varying:
        ch = varying[0]
        vec = tr.label_vector(x.lab, x.letters.index(ch), sizes[ch])
        tr.add_member(p.param, p.letters.index(ch), vec, "in")
    r = outer[0]
    atoms = tr.new_atoms(p.param.shape[p.letters.index(r)], tr.current or name)
    tr.add_member(p.param, p.letters.index(r), atoms, "out")
    shape = [1] * len(letters)
    shape[letters.index(r)] = -1
    return atoms.view(shape)


def _slice_reps(tr: Tracer, op: _Operand, batch: list[str], sizes: dict[str, int]) -> Tensor:
    """One representative atom per batch slice of ``op`` (all atoms of a slice tied)."""
    lab = op.lab.permute([op.letters.index(ch) for ch in batch] + [i for i, ch in enumerate(op.letters) if ch not in batch])
    lab = lab.expand([sizes[ch] if n == 1 else n for ch, n in zip(batch, lab.shape)] + list(lab.shape[len(batch):]))
    rows = lab.reshape(math.prod(sizes[ch] for ch in batch), -1)
    return tr.tie_rows(rows.contiguous()).reshape([sizes[ch] for ch in batch])


def _tie_contracted(tr: Tracer, name: str, a: _Operand, b: _Operand, ch: str, size: int) -> None:
    """Tie ``a``'s and ``b``'s channels along the contracted letter ``ch``, index by index
    (nothing to tie where neither carries channels along it, see :func:`_carries`)."""
    if not (_carries(tr, a, b, ch) or _carries(tr, b, a, ch)):
        return
    va = tr.label_vector(a.lab, a.letters.index(ch), size)
    vb = tr.label_vector(b.lab, b.letters.index(ch), size)
    if bool(((va != 0) ^ (vb != 0)).any()):
        tr.block(torch.cat([va, vb]), f"'{name}' in module '{tr.current}' contracts channels with an untracked tensor")
    tr.union(va, vb)


def _carries(tr: Tracer, op: _Operand, other: _Operand, ch: str) -> bool:
    """Whether ``op`` carries channels along letter ``ch``, which it shares with ``other``:
    its label varies there, and it holds produced channels or ``other`` varies there too.
    Raw parameter elements against an operand constant along ``ch`` are a fixed-size tensor
    (a relative-position table shared by all heads), not channels."""
    return op.varies(ch) and (other.varies(ch) or tr.produced(op.lab))


def _kept(tr: Tracer, op: _Operand, kept: list[str]) -> Tensor:
    """``op``'s label over its ``kept`` letters, its other letters reduced; zeros where its
    channels do not vary along any kept letter (the contraction consumed them)."""
    lab = tr.canon(op.lab)  # atoms the contraction tied share one id
    order = [op.letters.index(ch) for ch in kept]
    if not any(lab.shape[i] > 1 for i in order):
        return torch.zeros((1,) * len(kept), dtype=torch.long)
    for i in range(lab.ndim):
        if i not in order:
            lab = lab.amax(dim=i, keepdim=True)
    return lab.permute(order + [i for i in range(lab.ndim) if i not in order]).reshape([lab.shape[i] for i in order])
