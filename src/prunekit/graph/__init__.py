"""Trace a model into coupled channel groups (see :func:`trace`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import logging

import numpy as np
from torch import nn

from prunekit._perf import engine_call, walk
from prunekit.errors import PruningError
from prunekit.graph.dependency import (ChannelGroup, GroupMember, build_groups, describe, group_ties,
                                       summarize_unprunable, unprunable_cost)
from prunekit.graph.rules import RULES, register_rule
from prunekit.graph.meta import MetaStandIns, meta_tensors
from prunekit.graph.residual import ResidualBlock, find_blocks
from prunekit.graph.shapes import record_shapes
from prunekit.graph.tracer import Member, OpRecord, TraceState, Tracer, under
from prunekit.runtime import ModeInputs

log = logging.getLogger(__name__)

__all__ = ["ChannelGroup", "DependencyGraph", "GroupMember", "OpRecord", "RULES", "ResidualBlock", "blocks", "record_shapes",
           "register_rule", "trace", "module_names", "under"]


@dataclass
class DependencyGraph:
    """Coupled channel groups of a model, and what the trace learned to prune it exactly."""

    groups: list[ChannelGroup]
    comp: np.ndarray = field(repr=False)
    members: list[Member] = field(repr=False)
    state: TraceState = field(repr=False)
    ignore: tuple[str, ...] = ()
    # Groups that must keep the same fraction of their channels (indices into ``groups``):
    # see :func:`prunekit.graph.dependency.group_ties`. Allocators honour them.
    ties: list[tuple[int, ...]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [describe(self.groups)]
        for tie in self.ties:
            names = [self.groups[i].name for i in tie]
            lines.append("  keep one fraction: " + ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else ""))
        return "\n".join(lines)

    @property
    def n_channels(self) -> int:
        """Total number of channels over all groups."""
        return sum(g.size for g in self.groups)

    def unprunable(self) -> dict[str, Any]:
        """Group name -> reasons some of its channels cannot be removed."""
        return summarize_unprunable(self.groups)

    def unprunable_cost(self, model: nn.Module, top: int = 5) -> dict[str, Any]:
        """How much of ``model`` (the traced model) its unprunable channels hold: the share
        of the parameters touching one (``params_share``) and the ``top`` reasons by share,
        each with its channels and groups (:func:`prunekit.graph.dependency.unprunable_cost`)."""
        return unprunable_cost(self.groups, {n: tuple(p.shape) for n, p in model.named_parameters()}, top)

    def ops(self, mode: str = "eval") -> list[OpRecord]:
        """The ops recorded in ``mode`` ('eval' or 'train'), in execution order."""
        return self.state.ops[mode]

    def channels_of(self, ops: Iterable[OpRecord]) -> set[int]:
        """Channel ids (values of ``group.channels``) that flow into or out of ``ops``."""
        atoms: set[int] = set()
        for op in ops:
            for lab in list(op.in_labs) + list(op.out_labs):
                atoms.update(int(a) for a in lab.unique().tolist() if a != 0)
        comps = self.comp[np.fromiter(atoms, dtype=np.int64)] if atoms else np.zeros(0, dtype=np.int64)
        return set(int(c) for c in comps if c >= 0)

    def blocks(self, mode: str = "eval") -> list[ResidualBlock]:
        """Residual blocks of the pass traced in ``mode``: every add that joins a sub-path
        (the branch) to its own input, directly or through a shortcut path (see
        :mod:`prunekit.graph.residual`), in execution order.

        >>> import torch, torchvision
        >>> g = trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> [b.name for b in g.blocks()][:3], g.blocks()[2].shortcut_modules
        (['layer1.0', 'layer1.1', 'layer2.0'], ('layer2.0.downsample.0', 'layer2.0.downsample.1'))
        """
        if mode not in self.state.calls:
            raise PruningError(f"blocks: mode '{mode}' was not traced (traced: {', '.join(self.state.calls)})")
        return find_blocks(self.state.ops[mode], self.state.calls[mode], self.state.module_params)

    def groups_of(self, module: str) -> list[ChannelGroup]:
        """Groups that slice a parameter of ``module`` (a qualified module name)."""
        return [g for g in self.groups if any(m.tensor.startswith(module + ".") for m in g.members)]


def module_names(model: nn.Module, modules: Iterable[nn.Module | str] | None, option: str) -> tuple[str, ...]:
    """Resolve modules given as objects or qualified names to names; unknown ones raise."""
    if not modules:
        return ()
    names: dict[str, nn.Module] = {}
    by_id: dict[int, str] = {}
    for n, m in walk(model):
        names.setdefault(n, m)
        by_id.setdefault(id(m), n)
    out = []
    for m in modules:
        if isinstance(m, str):
            if m not in names:
                raise PruningError(f"{option}: no module named '{m}' in the model")
            out.append(m)
        elif isinstance(m, nn.Module):
            if id(m) not in by_id:
                raise PruningError(f"{option}: module {type(m).__name__} is not part of the model")
            out.append(by_id[id(m)])
        else:
            raise PruningError(f"{option}: expected nn.Module or module name, got {type(m).__name__}")
    return tuple(out)


def blocks(graph: DependencyGraph, mode: str = "eval") -> list[ResidualBlock]:
    """Residual blocks of a traced model (:meth:`DependencyGraph.blocks`)."""
    return graph.blocks(mode)


def _same_structure(state: TraceState, model: nn.Module, example_inputs: Any, meta: bool,
                    swapped: MetaStandIns | None) -> bool:
    calls, error = record_shapes(model, example_inputs, "train", meta=meta, swapped=swapped)
    ops = state.ops["eval"]
    return error is None and len(calls) == len(ops) and all(
        name == op.name and shapes == op.out_shapes for (name, shapes), op in zip(calls, ops))


@engine_call
def trace(model: nn.Module, example_inputs: Any, *, ignore: Iterable[nn.Module | str] | None = None,
          modes: tuple[str, ...] = ("eval", "train")) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and return its coupled channel groups.

    The model runs for real (once per mode; training mode with BatchNorm frozen, so
    training-only branches are seen and running statistics are not touched). Channels of
    modules in ``ignore`` (objects or qualified names) are kept.

    >>> import torch, torchvision
    >>> g = trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> len(g.groups) > 5
    True
    """
    ignored = module_names(model, ignore, "ignore")
    for mode in modes:
        if mode not in ("eval", "train"):
            raise PruningError(f"modes: unknown mode '{mode}' (expected 'eval' or 'train')")

    def run_all(meta: bool) -> TraceState:
        state = TraceState()
        swapped = meta_tensors(model) if meta else None  # one set of stand-ins serves every mode
        for mode in modes:
            if mode == "train" and "eval" in state.ops and _same_structure(state, model, example_inputs, meta, swapped):
                continue  # training mode runs the very same ops: nothing more to learn
            tracer = Tracer(model, state)
            tracer.ignored_prefixes = ignored
            try:
                tracer.run(example_inputs, mode, meta=meta, swapped=swapped)
            except Exception as exc:
                if meta or mode != "train" or "eval" not in state.ops or isinstance(example_inputs, ModeInputs):
                    raise
                # Eval mode ran: the inputs are fine for it, training mode wants others.
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise PruningError(
                    f"example_inputs: the model runs in eval mode but fails in training mode ({type(exc).__name__}: "
                    f"{first}); give training-mode inputs with prunekit.ModeInputs(eval=..., train=...) "
                    "(a detector wants (images, targets)), or trace eval mode only (modes=('eval',))") from exc
        state.meta = meta
        return state

    # Meta tensors carry shapes without arithmetic; a model they cannot run (data-dependent
    # ops, tensors created on the CPU inside forward) is traced for real.
    try:
        state = run_all(meta=True)
    except Exception as exc:  # noqa: BLE001 - any meta failure falls back to real tensors
        log.info("meta-device trace failed (%s); tracing with real tensors", exc)
        state = run_all(meta=False)
    groups, comp, members = build_groups(state, model)
    return DependencyGraph(groups, comp, members, state, ignored, group_ties(state, comp, groups))
