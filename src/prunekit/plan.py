"""The pruning plan: which indices of which tensors survive. Frozen and JSON-serialisable.

A plan is the one artefact that describes a pruned architecture: applied to a freshly built
original model it reproduces the pruned shapes exactly, so a pruned model is saved as a
state dict plus its plan, never as pickled code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AttrFix:
    """Set ``module.attr = value`` after slicing (a size hard-coded in a module attribute)."""

    module: str
    attr: str
    value: Any


@dataclass(frozen=True)
class PruningPlan:
    """Kept indices per tensor dim, plus attribute fixes and the original shapes.

    ``keep[name][dim]`` lists the indices kept along ``dim`` of parameter/buffer ``name``
    (only dims that shrink appear). ``shapes`` records the original shapes so that applying
    the plan to the wrong architecture fails loudly.
    """

    keep: dict[str, dict[int, list[int]]]
    shapes: dict[str, list[int]]
    attrs: tuple[AttrFix, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when the plan removes nothing."""
        return not self.keep

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (dims become string keys)."""
        return {
            "format": "prunekit.plan/1",
            "keep": {n: {str(d): list(map(int, idx)) for d, idx in dims.items()} for n, dims in self.keep.items()},
            "shapes": {n: list(map(int, s)) for n, s in self.shapes.items()},
            "attrs": [[a.module, a.attr, a.value] for a in self.attrs],
            "meta": self.meta,
        }

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningPlan":
        """Inverse of :meth:`to_dict`; raises ValueError on an unknown format."""
        if data.get("format") != "prunekit.plan/1":
            raise ValueError(f"not a prunekit plan (format={data.get('format')!r})")
        keep = {n: {int(d): list(idx) for d, idx in dims.items()} for n, dims in data["keep"].items()}
        attrs = tuple(AttrFix(m, a, tuple(v) if isinstance(v, list) else v) for m, a, v in data.get("attrs", []))
        return cls(keep, {n: list(s) for n, s in data["shapes"].items()}, attrs, dict(data.get("meta", {})))

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        """Parse a plan written by :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def compose(first: PruningPlan, second: PruningPlan) -> PruningPlan:
    """The plan equal to applying ``first`` and then ``second`` (whose indices refer to the
    model ``first`` produced): kept indices are chained, shapes stay those of the original,
    and ``second``'s attribute fixes win. Used to save a model pruned in several steps."""
    keep: dict[str, dict[int, list[int]]] = {n: dict(d) for n, d in first.keep.items()}
    for name, dims in second.keep.items():
        mine = keep.setdefault(name, {})
        for dim, idx in dims.items():
            prev = mine.get(dim)
            mine[dim] = [prev[i] for i in idx] if prev is not None else list(idx)
    shapes = dict(second.shapes)
    shapes.update(first.shapes)
    attrs = {(a.module, a.attr): a for a in first.attrs}
    attrs.update({(a.module, a.attr): a for a in second.attrs})
    steps = list(first.meta.get("steps", [first.meta])) + [second.meta]
    channels = steps[0].get("channels", 0)
    removed = sum(int(m.get("channels_removed", 0)) for m in steps)
    meta = {"steps": steps, "groups": steps[0].get("groups", 0), "channels": channels, "channels_removed": removed,
            "groups_pruned": max(int(m.get("groups_pruned", 0)) for m in steps),  # the most in any one step
            "ratio": removed / channels if channels else 0.0}
    return PruningPlan(keep, shapes, tuple(attrs.values()), meta)
