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
        for i, ((_, got), exp) in enumerate(zip(calls, want)):
            if got != exp:
                return Mismatch(mode, i, ops[i], f"shapes {got} != expected {exp}")
        if error is not None or len(calls) != len(want):
            i = min(len(calls), len(ops) - 1)
            return Mismatch(mode, i, ops[i], error or f"{len(calls)} ops ran, {len(want)} expected")
    return None
