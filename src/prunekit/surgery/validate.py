"""Check a pruned model against the shapes its plan predicts, by running it once per
traced mode.

This is what makes pruning safe on unknown code: a reshape with a size hard-coded in the
forward, a split whose sizes cannot be rewritten, or a branch that depends on a channel
count shows up as a mismatch at a known op, and :mod:`prunekit.planning` keeps the groups
involved unpruned. (Plans that change which ops run are checked by
:func:`prunekit.surgery.replace.check_structure`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit.graph import DependencyGraph, OpRecord, record_shapes

Shapes = list[list[tuple[int, ...]]]


@dataclass
class Mismatch:
    """Where a pruned model departed from the predicted shapes."""

    mode: str
    index: int
    op: OpRecord
    message: str


def check(model: nn.Module, example_inputs: Any, graph: DependencyGraph, expected: dict[str, Shapes]) -> Mismatch | None:
    """Run ``model`` in every traced mode and compare each op's output shapes to
    ``expected``; return the first mismatch (or None when all agree).

    Runs on meta tensors (shapes only) when the trace did; a failure found there is
    confirmed with a real forward, so the verdict never rests on a meta-only limitation.
    """
    if not graph.state.meta:
        return _check(model, example_inputs, graph, expected, meta=False)
    found = _check(model, example_inputs, graph, expected, meta=True)
    if found is not None:
        found = _check(model, example_inputs, graph, expected, meta=False)
    return found


def _check(model: nn.Module, example_inputs: Any, graph: DependencyGraph, expected: dict[str, Shapes],
           meta: bool) -> Mismatch | None:
    for mode, want in expected.items():
        calls, error = record_shapes(model, example_inputs, mode, meta=meta)
        ops = graph.state.ops[mode]
        shaped = value_shaped(ops)
        first = shaped.index(True) if True in shaped else len(ops)  # the first value-shaped op
        diverged = False
        for i, ((name, got), exp) in enumerate(zip(calls, want)):
            if name != ops[i].name and i > first:
                # Control flow that follows values (an empty set of boxes, a loop over the
                # levels present) ran other ops: what follows cannot be lined up.
                diverged = True
                break
            if not _agree(got, exp, ops[i].out_shapes, shaped[i]):
                return Mismatch(mode, i, ops[i], f"shapes {got} != expected {exp}")
        if error is None and len(calls) != len(want) and min(len(calls), len(want)) > first:
            diverged = True
        if error is not None or (len(calls) != len(want) and not diverged):
            i = min(len(calls), len(ops) - 1)
            return Mismatch(mode, i, ops[i], error or f"{len(calls)} ops ran, {len(want)} expected")
    return None


def value_shaped(ops: list[OpRecord]) -> list[bool]:
    """Per op, whether its output shapes may depend on tensor values: it is
    :attr:`OpRecord.data_dependent`, reads a tensor such an op produced (through the
    dataflow), or creates a tensor from no traced input once one ran (its size may be a
    count of surviving boxes read off a shape)."""
    tainted: set[int] = set()
    out = []
    for op in ops:
        t = op.data_dependent or any(v in tainted for v in op.in_values) or (
            bool(tainted) and all(v < 0 for v in op.in_values))
        if t:
            tainted.update(op.out_values)
        out.append(t)
    return out


def _agree(got: list[tuple[int, ...]], exp: list[tuple[int, ...]], orig: list[tuple[int, ...]], shaped: bool) -> bool:
    """Whether a pruned op's output shapes ``got`` agree with the prediction ``exp``: equal,
    or for a value-shaped op (see :func:`value_shaped`) equal on the dims pruning changes
    (its channel dims); the others may follow the data."""
    if not shaped:
        return got == exp
    return len(got) == len(exp) and all(
        len(g) == len(e) and all(gd == ed for gd, ed, od in zip(g, e, o) if ed != od)
        for g, e, o in zip(got, exp, orig))
