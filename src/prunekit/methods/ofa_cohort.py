"""The cohort of a once-for-all run (:mod:`prunekit.methods.ofa`): one set of shared weights
and many compact structures, each a FLOPs budget at an input resolution.

:class:`OFACohort` holds the shared (unpruned, jointly trained) network and, per member, the
channels it removes from every coupled group. :meth:`OFACohort.extract` turns any member
into a physically pruned model with a plan relative to the original architecture (so
:func:`prunekit.save` and :func:`prunekit.load` work on it), re-estimating the BatchNorm
statistics on calibration batches resized to the member's resolution when given;
:meth:`OFACohort.export` writes every member (weights + plan, and ONNX). A cohort saves and
loads without pickle: ``model.safetensors`` (the shared weights) and ``cohort.json`` (the
members, the input shape, the ignored modules, the model spec), the directory replaced as a
whole (:func:`prunekit.runtime.atomic_directory`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunekit as pk
from prunekit.errors import PruningError
from prunekit.features import as_batch
from prunekit.methods import MethodResult
from prunekit.planning import channel_plan
from prunekit.runtime import atomic_directory, infer_device, readable_directory
from prunekit.surgery import apply_plan
from prunekit.surgery.validate import check

__all__ = ["Member", "OFACohort", "resize"]

COHORT = "cohort.json"
WEIGHTS = "model.safetensors"
FORMAT = "prunekit.ofa_cohort/1"

Resolution = tuple[int, int]


def resize(x: Tensor, resolution: Resolution) -> Tensor:
    """``x`` (N, C, H, W) bilinearly resampled to ``resolution`` (H', W'); ``x`` itself at its
    own size. The one resampling of the method: training inputs, example inputs and BN
    calibration batches of a member all go through it."""
    if tuple(x.shape[-2:]) == tuple(resolution):
        return x
    return F.interpolate(x, size=tuple(resolution), mode="bilinear", align_corners=False)


@dataclasses.dataclass(frozen=True)
class Member:
    """One compact structure of the cohort: ``rate`` (the FLOPs budget, a fraction kept of
    the cohort's base), ``resolution`` (input H, W), ``removed`` (local channels removed per
    group of the graph, in ``graph.groups`` order), and its measured ``flops`` (count at its
    resolution), ``flops_fraction`` (of the cohort's base for that budget) and ``params``."""

    rate: float
    resolution: Resolution
    removed: tuple[tuple[int, ...], ...]
    flops: float
    flops_fraction: float
    params: float

    @property
    def name(self) -> str:
        """``flops0.5_32x32``: a file-system-safe name of the member (the rate in full, so
        that two budgets never share a name)."""
        return f"flops{self.rate:g}_{self.resolution[0]}x{self.resolution[1]}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"rate": self.rate, "resolution": list(self.resolution), "removed": [list(r) for r in self.removed],
                "flops": self.flops, "flops_fraction": self.flops_fraction, "params": self.params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Member":
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["rate"]), (int(d["resolution"][0]), int(d["resolution"][1])),
                   tuple(tuple(int(c) for c in r) for r in d["removed"]), float(d["flops"]),
                   float(d["flops_fraction"]), float(d["params"]))


def group_signature(graph: Any) -> list[list[Any]]:
    """``[name, size]`` of every group of ``graph``: what a member's ``removed`` lists are
    indexed by (checked when a cohort is traced again at another resolution or after loading)."""
    return [[g.name, int(g.size)] for g in graph.groups]


class OFACohort:
    """Shared weights (``model``, the unpruned architecture, in eval mode) and the
    :class:`Member` structures over them. ``input_shape`` is the reference example input
    (N, C, H, W), ``ignore`` the module names whose channels stay (the trace's), ``groups``
    the :func:`group_signature` the members index, ``meta`` anything JSON-able about the run
    (base FLOPs, budget base, criterion, search record)."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], members: Sequence[Member], *,
                 groups: list[list[Any]], ignore: Sequence[str] = (), meta: dict[str, Any] | None = None,
                 graphs: dict[Resolution, Any] | None = None) -> None:
        self.model = model.eval()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.groups = [list(g) for g in groups]
        self.ignore = tuple(ignore)
        self.meta = dict(meta or {})
        self._members = sorted(members, key=lambda m: (-m.resolution[0], -m.resolution[1], m.rate))
        self._graphs: dict[Resolution, Any] = dict(graphs or {})

    # ------------------------------------------------------------------ members
    @property
    def reference(self) -> Resolution:
        """The reference (largest) resolution: the example input's H, W."""
        return (self.input_shape[-2], self.input_shape[-1])

    def members(self) -> list[dict[str, Any]]:
        """Every member as ``{"name", "rate", "resolution", "flops", "flops_fraction",
        "flops_of_reference", "params"}``: FLOPs counted at the member's resolution, as a
        fraction of the cohort's budget base and of the unpruned network at the reference
        resolution (what to compare members of different resolutions by)."""
        ref = float(self.meta.get("reference_flops", 0.0)) or 1.0
        return [{"name": m.name, "rate": m.rate, "resolution": m.resolution, "flops": m.flops,
                 "flops_fraction": m.flops_fraction, "flops_of_reference": m.flops / ref, "params": m.params}
                for m in self._members]

    def member(self, flops: float, resolution: int | Sequence[int] | None = None) -> Member:
        """The member of budget ``flops`` at ``resolution`` (an int for a square input, (H, W),
        or None for the reference); PruningError listing the members when there is none."""
        res = self.reference if resolution is None else _as_resolution(resolution)
        for m in self._members:
            if abs(m.rate - float(flops)) < 1e-9 and m.resolution == res:
                return m
        have = ", ".join(f"flops={m.rate:g} at {m.resolution[0]}x{m.resolution[1]}" for m in self._members)
        raise PruningError(f"OFA cohort: no member with flops={flops:g} at {res[0]}x{res[1]}; members: {have}")

    def example_input(self, resolution: Resolution) -> Tensor:
        """A fixed random input of the reference shape resampled to ``resolution``, on the model's device."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(self.input_shape, generator=gen).to(infer_device(self.model))
        return resize(x, resolution)

    def graph(self, resolution: Resolution) -> Any:
        """The shared model traced at ``resolution`` (cached); PruningError when its groups
        differ from the ones the members index."""
        if resolution not in self._graphs:
            g = pk.trace(self.model.eval(), self.example_input(resolution), ignore=self.ignore or None)
            if group_signature(g) != self.groups:
                raise PruningError(f"OFA cohort: the model traced at {resolution[0]}x{resolution[1]} has other "
                                   "channel groups than the cohort's members index")
            self._graphs[resolution] = g
        return self._graphs[resolution]

    def masks(self, flops: float, resolution: int | Sequence[int] | None = None) -> dict[int, np.ndarray]:
        """Group index -> 0/1 keep flags (float32) of the member: what a ``mask`` gate of that
        group multiplies by (:mod:`prunekit.gates.mask`)."""
        m = self.member(flops, resolution)
        out = {}
        for (_, size), removed, g in zip(self.groups, m.removed, self.graph(m.resolution).groups):
            keep = np.ones(size, dtype=np.float32)
            keep[list(removed)] = 0.0
            out[g.index] = keep
        return out

    # ------------------------------------------------------------------ extraction
    def extract(self, flops: float, resolution: int | Sequence[int] | None = None, *,
                calibration: Iterable[Any] | None = None) -> MethodResult:
        """The member of budget ``flops`` at ``resolution`` (None: the reference) as a
        physically pruned copy of the shared model, with its plan (relative to the original
        architecture, validated by running it at the member's resolution) and ``info``
        (rate, resolution, FLOPs, params, BN re-estimation). With ``calibration`` (batches of
        inputs or ``(inputs, targets)``, at any resolution: they are resampled to the
        member's) the BatchNorm running statistics are re-estimated on them
        (:func:`prunekit.recover.recalibrate_bn`): the shared running averages mix every
        member's statistics. The shared model is never changed. PruningError for an unknown
        member or a plan the model's forward rejects."""
        from prunekit.recover.bn import recalibrate_bn

        m = self.member(flops, resolution)
        graph = self.graph(m.resolution)
        removed = [np.asarray(r, dtype=np.int64) for r in m.removed]
        meta = {"method": "ofa", "criterion": self.meta.get("criterion"), "target_flops": m.rate,
                "resolution": list(m.resolution), "groups": len(graph.groups),
                "groups_pruned": int(sum(len(r) > 0 for r in removed)),
                "channels_removed": int(sum(len(r) for r in removed)), "channels": graph.n_channels,
                "ratio": float(sum(len(r) for r in removed) / max(1, graph.n_channels)),
                "flops_kept": m.flops_fraction}
        plan, expected = channel_plan(self.model, graph, removed, meta)
        small = apply_plan(self.model, plan)
        x = self.example_input(m.resolution)
        mismatch = check(small, x, graph, expected) if expected else None
        if mismatch is not None:
            raise PruningError(f"OFA member {m.name}: pruning breaks op '{mismatch.op.name}' in module "
                               f"'{mismatch.op.module}' ({mismatch.mode} mode: {mismatch.message})")
        info: dict[str, Any] = {"rate": m.rate, "resolution": m.resolution, "flops": m.flops,
                                "flops_fraction": m.flops_fraction, "params": m.params, "bn_recalibrated": 0}
        if calibration is not None:
            batches = [resize(as_batch(b)[0].to(x.device), m.resolution) for b in calibration]
            info["bn_recalibrated"] = recalibrate_bn(small, batches)
            info["bn_batches"] = len(batches)
        return MethodResult(small.eval(), plan, info)

    def export(self, directory: str | os.PathLike[str], *, calibration: Iterable[Any] | None = None,
               onnx: bool = True, model_spec: str | None = None, opset: int = 17) -> dict[str, Any]:
        """Write every member to ``directory/<member name>/`` (``model.safetensors`` +
        ``plan.json`` as :func:`prunekit.save` writes them, loadable with :func:`prunekit.load`,
        and with ``onnx`` a checked ``model.onnx`` at the member's resolution), the whole
        directory replaced at once. ``calibration`` as in :meth:`extract`. Returns member
        name -> ``{"rate", "resolution", "flops", "onnx"}`` (the ONNX check figures or None)."""
        from prunekit.export import export_onnx
        from prunekit.persist import write_model

        calib = list(calibration) if calibration is not None else None
        out: dict[str, Any] = {}
        with atomic_directory(directory) as tmp:
            for m in self._members:
                res = self.extract(m.rate, m.resolution, calibration=calib)
                sub = tmp / m.name
                sub.mkdir()
                extra = {"input_shape": [1, self.input_shape[1], *m.resolution], **self._spec_meta()}
                write_model(res.model, res.plan, sub, model_spec=model_spec or self.meta.get("model_spec"),
                            extra=extra)
                figures = None
                if onnx:
                    figures = export_onnx(res.model.cpu(), self.example_input(m.resolution)[:1].cpu(),
                                          sub / "model.onnx", opset=opset)
                    figures["path"] = str(Path(directory) / m.name / "model.onnx")
                out[m.name] = {"rate": m.rate, "resolution": m.resolution, "flops": m.flops, "onnx": figures}
        return out

    # ------------------------------------------------------------------ persistence
    def _spec_meta(self) -> dict[str, Any]:
        return {k: self.meta[k] for k in ("num_classes", "in_chans") if k in self.meta}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of everything but the weights."""
        return {"format": FORMAT, "input_shape": list(self.input_shape), "ignore": list(self.ignore),
                "groups": self.groups, "members": [m.to_dict() for m in self._members], "meta": self.meta}

    def write(self, directory: str | os.PathLike[str], *, model_spec: str | None = None,
              extra: dict[str, Any] | None = None) -> None:
        """Write ``model.safetensors`` and ``cohort.json`` into ``directory`` (created) with
        plain writes: for a directory being written by :func:`prunekit.runtime.atomic_directory`
        (as :meth:`save` and the CLI do). ``model_spec`` and ``extra`` go into the meta."""
        from safetensors.torch import save_model

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if model_spec is not None:
            self.meta["model_spec"] = model_spec
        if extra:
            self.meta.update(extra)
        save_model(self.model, str(path / WEIGHTS))
        (path / COHORT).write_text(json.dumps(self.to_dict(), indent=1))

    def save(self, directory: str | os.PathLike[str], *, model_spec: str | None = None,
             extra: dict[str, Any] | None = None) -> Path:
        """Save the cohort to ``directory``, replaced as a whole (see :mod:`prunekit.persist`);
        ``model_spec`` (e.g. ``"resnet20"``) lets :meth:`load` rebuild the architecture by
        itself. Returns the directory."""
        with atomic_directory(directory) as tmp:
            self.write(tmp, model_spec=model_spec, extra=extra)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: nn.Module | Callable[[], nn.Module] | None = None, *,
             trust_code: bool = False) -> "OFACohort":
        """A cohort saved by :meth:`save`: ``model`` is the original architecture (a module or
        a builder; None: the saved ``model_spec``, a file spec only with ``trust_code``), its
        weights loaded strictly from ``model.safetensors``. ValueError for a directory that is
        not a cohort or weights that do not fit."""
        from safetensors.torch import load_model

        from prunekit.persist import build_original

        where = readable_directory(directory)
        path = where / COHORT
        if not path.exists():
            raise FileNotFoundError(f"{Path(directory) / COHORT}: no cohort.json (was this written by OFACohort.save?)")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            members = [Member.from_dict(m) for m in d["members"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{Path(directory) / COHORT}: not a readable OFA cohort ({exc})") from None
        net = build_original(model, d.get("meta", {}), Path(directory) / COHORT, trust_code=trust_code)
        try:
            load_model(net, str(where / WEIGHTS), strict=True)
        except Exception as exc:  # noqa: BLE001 - a missing, truncated or foreign weights file
            raise ValueError(f"{Path(directory) / WEIGHTS}: the weights do not fit the architecture "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        return cls(net, d["input_shape"], members, groups=d["groups"], ignore=d.get("ignore", ()),
                   meta=d.get("meta", {}))

    def __repr__(self) -> str:
        names = ", ".join(m.name for m in self._members)
        return f"OFACohort({len(self._members)} members: {names})"


def _as_resolution(resolution: int | Sequence[int]) -> Resolution:
    """``s`` -> ``(s, s)``; ``(h, w)`` as ints; ValueError otherwise."""
    if isinstance(resolution, (int, np.integer)):
        return (int(resolution), int(resolution))
    vals = tuple(int(v) for v in resolution)
    if len(vals) != 2:
        raise ValueError(f"resolution {resolution!r}: give an int (square) or (height, width)")
    return vals  # type: ignore[return-value]
