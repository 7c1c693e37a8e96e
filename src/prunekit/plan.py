"""The pruning plan: an ordered list of typed steps that turns an original model into the
pruned one. Frozen and JSON-serialisable.

A plan is the one artefact that describes a pruned architecture: applied to a freshly built
original model it reproduces the pruned structure exactly, so a pruned model is saved as a
state dict plus its plan, never as pickled code. Step kinds:

* :class:`Slice` — kept indices per tensor dim (channel pruning), with the original shapes
  so a plan applied to the wrong architecture fails loudly;
* :class:`SetAttr` — ``module.attr = value`` (a size held in a module attribute);
* :class:`Replace` — the module at a qualified name becomes one built by a *registered*
  factory from JSON arguments (a conv replaced by a low-rank pair, a fused conv); its
  tensors travel in the weights file, never as code;
* :class:`Drop` — a module or residual branch replaced by identity / zeros, or removed
  from its ``nn.Sequential`` / ``nn.ModuleList``.

Steps apply in order; names in a step refer to the model as the steps before it left it.
Format ``prunekit.plan/2``; plans written as ``prunekit.plan/1`` (one slice plus attribute
fixes) still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Union

FORMAT = "prunekit.plan/2"
_V1 = "prunekit.plan/1"

Keep = dict[str, dict[int, list[int]]]


@dataclass(frozen=True)
class Slice:
    """Keep ``keep[name][dim]`` indices along ``dim`` of parameter/buffer ``name`` (only
    dims that shrink appear); ``shapes[name]`` is the tensor's shape before the step."""

    keep: Keep
    shapes: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (dims become string keys)."""
        return {"kind": "slice",
                "keep": {n: {str(d): list(map(int, idx)) for d, idx in dims.items()} for n, dims in self.keep.items()},
                "shapes": {n: list(map(int, s)) for n, s in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Slice":
        """Inverse of :meth:`to_dict`."""
        return cls({n: {int(d): list(idx) for d, idx in dims.items()} for n, dims in data["keep"].items()},
                   {n: list(s) for n, s in data["shapes"].items()})


@dataclass(frozen=True)
class SetAttr:
    """Set ``module.attr = value`` (a size hard-coded in a module attribute)."""

    module: str
    attr: str
    value: Any

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"kind": "set_attr", "module": self.module, "attr": self.attr, "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SetAttr":
        """Inverse of :meth:`to_dict` (JSON lists become tuples, as sizes are)."""
        v = data["value"]
        return cls(data["module"], data["attr"], tuple(v) if isinstance(v, list) else v)


AttrFix = SetAttr  # the name used by plan/1 code


@dataclass(frozen=True)
class Replace:
    """Replace the module at ``module`` by ``factories.get(factory)(**args)``.

    ``state`` optionally holds the new module's tensors for applying the step in memory
    (e.g. the factors of an SVD); it is not part of the JSON form or of equality, because a
    saved model's tensors live in its weights file and are loaded after the plan is applied.
    ``keeps_tensors``: the new module holds the replaced one's tensors, under the same names
    and shapes, and takes them over when ``state`` is None (a module class swapped for one
    that runs the widths pruning left, e.g. ``nn.MultiheadAttention``); slices after such a
    step still belong to the plan's channel part (:attr:`PruningPlan.keep`)."""

    module: str
    factory: str
    args: dict[str, Any]
    state: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    keeps_tensors: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without ``state``)."""
        out = {"kind": "replace", "module": self.module, "factory": self.factory, "args": self.args}
        if self.keeps_tensors:
            out["keeps_tensors"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Replace":
        """Inverse of :meth:`to_dict`."""
        return cls(data["module"], data["factory"], dict(data["args"]), keeps_tensors=bool(data.get("keeps_tensors")))


DROP_MODES = ("identity", "zero", "remove")


@dataclass(frozen=True)
class Drop:
    """Drop the module at ``module``: ``mode`` 'identity' (``nn.Identity``: a whole residual
    block whose shortcut is the identity), 'zero' (outputs zeros shaped like its input: a
    residual *branch*, so the sum keeps the shortcut) or 'remove' (deleted from its
    ``nn.Sequential`` / ``nn.ModuleList`` parent; the other entries keep their names)."""

    module: str
    mode: str = "identity"

    def __post_init__(self) -> None:
        if self.mode not in DROP_MODES:
            raise ValueError(f"Drop('{self.module}'): mode must be one of {DROP_MODES}, not {self.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"kind": "drop", "module": self.module, "mode": self.mode}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Drop":
        """Inverse of :meth:`to_dict`."""
        return cls(data["module"], data.get("mode", "identity"))


Step = Union[Slice, SetAttr, Replace, Drop]
STEP_KINDS: dict[str, type] = {"slice": Slice, "set_attr": SetAttr, "replace": Replace, "drop": Drop}
STRUCTURAL = (Replace, Drop)


@dataclass(frozen=True)
class PruningPlan:
    """Ordered steps plus free-form ``meta`` (what was asked, what was measured).

    ``keep``, ``shapes`` and ``attrs`` give the *channel part*: the slices and attribute
    fixes before the first structural step (the whole plan of a channel-pruning run; a
    Replace that ``keeps_tensors`` does not end it)."""

    steps: tuple[Step, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_slices(cls, keep: Keep, shapes: dict[str, list[int]], attrs: tuple[SetAttr, ...] | list[SetAttr] = (),
                    meta: dict[str, Any] | None = None) -> "PruningPlan":
        """The plan of one channel slice and its attribute fixes (an empty ``keep`` gives no slice step)."""
        steps: list[Step] = [Slice(keep, shapes)] if keep else []
        return cls(tuple(steps) + tuple(attrs), dict(meta or {}))

    def _channel_part(self) -> list[Step]:
        out = []
        for s in self.steps:
            if isinstance(s, Replace) and s.keeps_tensors:
                continue  # the tensors, their names and the slices' indices stay valid across it
            if isinstance(s, STRUCTURAL):
                break
            out.append(s)
        return out

    @property
    def keep(self) -> Keep:
        """Kept indices per tensor dim of the channel part (chained over its slices)."""
        return _chain([s for s in self._channel_part() if isinstance(s, Slice)])[0]

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Original shapes of the tensors the channel part slices."""
        return _chain([s for s in self._channel_part() if isinstance(s, Slice)])[1]

    @property
    def attrs(self) -> tuple[SetAttr, ...]:
        """Attribute fixes of the channel part (later ones win)."""
        fixes = {(s.module, s.attr): s for s in self._channel_part() if isinstance(s, SetAttr)}
        return tuple(fixes.values())

    @property
    def structural(self) -> bool:
        """True when the plan replaces or drops modules (not only slices)."""
        return any(isinstance(s, STRUCTURAL) for s in self.steps)

    @property
    def is_empty(self) -> bool:
        """True when the plan changes nothing."""
        return not any(not isinstance(s, Slice) or s.keep for s in self.steps)

    def with_meta(self, **meta: Any) -> "PruningPlan":
        """A copy whose meta is updated with ``meta``."""
        return replace(self, meta={**self.meta, **meta})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in format ``prunekit.plan/2``."""
        return {"format": FORMAT, "steps": [s.to_dict() for s in self.steps], "meta": self.meta}

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningPlan":
        """Inverse of :meth:`to_dict`; also reads ``prunekit.plan/1``. Raises ValueError on an
        unknown format or step kind."""
        fmt = data.get("format")
        if fmt == _V1:
            keep = {n: {int(d): list(idx) for d, idx in dims.items()} for n, dims in data["keep"].items()}
            attrs = tuple(SetAttr(m, a, tuple(v) if isinstance(v, list) else v) for m, a, v in data.get("attrs", []))
            return cls.from_slices(keep, {n: list(s) for n, s in data["shapes"].items()}, attrs, data.get("meta"))
        if fmt != FORMAT:
            raise ValueError(f"not a prunekit plan (format={fmt!r})")
        steps = []
        for i, s in enumerate(data.get("steps", [])):
            kind = STEP_KINDS.get(s.get("kind"))
            if kind is None:
                raise ValueError(f"plan step {i}: unknown kind {s.get('kind')!r} (known: {', '.join(STEP_KINDS)})")
            steps.append(kind.from_dict(s))  # type: ignore[attr-defined]
        return cls(tuple(steps), dict(data.get("meta", {})))

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        """Parse a plan written by :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _chain(slices: list[Slice]) -> tuple[Keep, dict[str, list[int]]]:
    """One slice equal to applying ``slices`` in order (indices chained, first shapes kept)."""
    keep: Keep = {}
    shapes: dict[str, list[int]] = {}
    for s in slices:
        for name, dims in s.keep.items():
            mine = keep.setdefault(name, {})
            for dim, idx in dims.items():
                prev = mine.get(dim)
                mine[dim] = [prev[i] for i in idx] if prev is not None else list(idx)
        for name, shape in s.shapes.items():
            shapes.setdefault(name, list(shape))
    return keep, shapes


def _merge(steps: list[Step]) -> list[Step]:
    """Consecutive slices become one (so two channel-pruning rounds save as one slice);
    attribute fixes of one module attribute keep only the last within a channel run."""
    out: list[Step] = []
    for s in steps:
        if isinstance(s, Slice):
            # Merge into the last slice of the current channel run (fixes in between are
            # independent of tensor indices, so order between them does not matter).
            j = len(out) - 1
            while j >= 0 and isinstance(out[j], SetAttr):
                j -= 1
            if j >= 0 and isinstance(out[j], Slice):
                keep, shapes = _chain([out[j], s])  # type: ignore[list-item]
                out[j] = Slice(keep, shapes)
                continue
        out.append(s)
    # Within each run between structural steps, a later fix of the same attribute wins.
    result: list[Step] = []
    run: list[Step] = []
    for s in out:
        if isinstance(s, STRUCTURAL):
            result += _last_fixes(run) + [s]
            run = []
        else:
            run.append(s)
    return result + _last_fixes(run)


def _last_fixes(run: list[Step]) -> list[Step]:
    """``run`` without the attribute fixes that a later fix of the same attribute overrides."""
    last = {(f.module, f.attr): i for i, f in enumerate(run) if isinstance(f, SetAttr)}
    return [f for i, f in enumerate(run) if not isinstance(f, SetAttr) or last[(f.module, f.attr)] == i]


def compose(first: PruningPlan, second: PruningPlan) -> PruningPlan:
    """The plan equal to applying ``first`` and then ``second`` (whose names and indices
    refer to the model ``first`` produced): the steps in order, consecutive slices chained.
    Works across step kinds. Used to save a model pruned in several steps; the meta sums the
    channel counts of the rounds."""
    steps = _merge(list(first.steps) + list(second.steps))
    rounds = list(first.meta.get("steps", [first.meta])) + [second.meta]
    channels = rounds[0].get("channels", 0)
    removed = sum(int(m.get("channels_removed", 0)) for m in rounds)
    meta = {"steps": rounds, "groups": rounds[0].get("groups", 0), "channels": channels, "channels_removed": removed,
            "groups_pruned": max(int(m.get("groups_pruned", 0)) for m in rounds),  # the most in any one round
            "ratio": removed / channels if channels else 0.0}
    return PruningPlan(tuple(steps), meta)
