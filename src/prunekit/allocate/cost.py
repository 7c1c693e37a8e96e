"""A differentiable cost model: FLOPs, parameters and latency of a traced model as a
function of which channels are kept.

From the trace, every counted op (conv, linear, matmul, attention) costs
``F0 * prod_f kept_f(m) / size_f`` where ``F0`` is its cost at the traced shapes and each
factor ``f`` is one dim whose size pruning changes (the op's output channels, heads, the
contracted input channels); ``kept_f`` counts the surviving positions along that dim given
a keep mask ``m`` over all channels of all groups (concatenated in ``graph.groups`` order).
A position carrying one channel survives with ``m[c]``, one carrying several (a head-dim
position shared by every head) with ``1 - prod(1 - m[c])``, an untracked one always. At a
binary mask this is exactly the pruned model's count; between, it is a polynomial in the
mask, so gates and policies can differentiate it. The per-op formulas are
:func:`prunekit.graph.opcost.op_cost` (``nn.MultiheadAttention``'s call is five terms,
:func:`~prunekit.graph.opcost.mha_terms`: its projections scale with its heads and the
embedding widths they read and write, its attention with its heads); ops whose channels
pruning never changes are constant terms, and whatever the model counts that no formula
covers is a constant remainder.
Parameters are the same polynomial over tensors and their sliced dims.

>>> import torch, torchvision, prunekit as pk
>>> from prunekit.allocate.cost import CostModel
>>> m = torchvision.models.resnet18(); x = torch.randn(1, 3, 64, 64)
>>> cost = CostModel(pk.trace(m, x), m, x)
>>> cost.base_flops == pk.measure.count_flops(m, x)
True
>>> half = cost.from_keep(torch.full((len(cost.sizes),), 0.5))
>>> 0.2 < float(cost.flops(half) / cost.base_flops) < 0.35   # ~quadratic in width
True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from prunekit._perf import named_tensors
from prunekit.graph.opcost import CONV_OPS, mha_terms, op_cost
from prunekit.planning import removed_channels

log = logging.getLogger(__name__)

__all__ = ["CostModel"]


@dataclass
class _Factor:
    """Kept count of one dim: ``fixed`` positions always survive, ``single[i]`` survives
    with ``m[single[i]]``, each ``multi[j]`` (channel ids) with ``1 - prod(1 - m)``."""

    size: int
    fixed: int
    single: np.ndarray
    multi: list[np.ndarray]


class _Polynomial:
    """``const + sum_t coef[t] * prod_{f in t} kept_f(m) / size_f``, evaluated in a few
    vectorised torch ops (index sums per factor, a product per term)."""

    def __init__(self, const: float, coefs: list[float], factors: list[list[_Factor]]) -> None:
        self.const = float(const)
        self.coefs = torch.tensor(coefs, dtype=torch.float64)
        fac_term, sizes, fixed, s_idx, s_fac, m_idx, m_row, row_fac = [], [], [], [], [], [], [], []
        n_rows = 0
        for t, fs in enumerate(factors):
            for f in fs:
                k = len(sizes)
                fac_term.append(t)
                sizes.append(f.size)
                fixed.append(f.fixed)
                s_idx.append(f.single)
                s_fac.append(np.full(len(f.single), k))
                for chs in f.multi:
                    m_idx.append(chs)
                    m_row.append(np.full(len(chs), n_rows))
                    row_fac.append(k)
                    n_rows += 1
        cat = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts else \
            torch.zeros(0, dtype=torch.long)  # noqa: E731
        self.n_terms, self.n_factors, self.n_rows = len(coefs), len(sizes), n_rows
        self.fac_term = torch.tensor(fac_term, dtype=torch.long)
        self.sizes = torch.tensor(sizes, dtype=torch.float64)
        self.fixed = torch.tensor(fixed, dtype=torch.float64)
        self.s_idx, self.s_fac = cat(s_idx), cat(s_fac)
        self.m_idx, self.m_row = cat(m_idx), cat(m_row)
        self.row_fac = torch.tensor(row_fac, dtype=torch.long)

    def __call__(self, mask: Tensor) -> Tensor:
        return self.const + (self.coefs * self.terms(mask)).sum()

    def terms(self, mask: Tensor) -> Tensor:
        """``prod_{f in t} kept_f(m) / size_f`` of every term ``t``."""
        m = mask.to(torch.float64)
        kept = self.fixed.clone().index_add(0, self.s_fac, m[self.s_idx])
        if self.n_rows:
            gone = torch.ones(self.n_rows, dtype=torch.float64).scatter_reduce(
                0, self.m_row, 1 - m[self.m_idx], reduce="prod")
            kept = kept.index_add(0, self.row_fac, 1 - gone)
        ratio = kept / self.sizes
        return torch.ones(self.n_terms, dtype=torch.float64).scatter_reduce(0, self.fac_term, ratio, reduce="prod")


class CostModel:
    """FLOPs / params / latency of ``model`` (traced as ``graph``) for any keep mask.

    ``sizes[g]`` is the channel count of group ``g``; a mask has ``sum(sizes)`` entries.
    ``example_inputs``, when given, makes the FLOPs exact at full width for models with ops
    outside the formulas (their FLOPs become a constant); ``flops``, the model's FLOPs when
    already counted, does the same without counting again; ``latency_table`` (see
    :mod:`prunekit.measure.latency_table`) enables :meth:`latency`."""

    def __init__(self, graph: Any, model: nn.Module, example_inputs: Any = None, *,
                 latency_table: Any = None, flops: float | None = None) -> None:
        self.groups = list(graph.groups)
        self.sizes = [g.size for g in self.groups]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        n_comp = int(graph.comp.max()) + 2
        chan_of_comp = np.full(n_comp, -1, dtype=np.int64)
        for g, off in zip(self.groups, self.offsets):
            chan_of_comp[g.channels] = off + np.arange(g.size)
        comp = np.where(graph.comp >= 0, graph.comp, n_comp - 1)
        self._chan = chan_of_comp[comp]  # atom -> global channel (-1: untracked or never removed)
        self._chan[0] = -1
        self._cache: dict[tuple[int, int], tuple[Tensor, _Factor]] = {}
        self._flops, self._layers = self._build_flops(graph.ops("eval"))
        self.base_flops = float(self._flops(torch.ones(self.n)))
        if flops is None and example_inputs is not None:
            from prunekit.measure.counts import count_flops_meta_first

            flops = float(count_flops_meta_first(model, example_inputs))
        if flops is not None:
            measured = float(flops)
            if measured < self.base_flops * (1 - 1e-9):
                log.warning("cost model: formulas count %.4g FLOPs, the model %.4g", self.base_flops, measured)
            self._flops.const += measured - self.base_flops
            self.base_flops = measured
        self._params = self._build_params(graph, model)
        self.base_params = float(self._params(torch.ones(self.n)))
        self.latency_table = latency_table
        if latency_table is not None:
            # One single-factor term per tabled layer's in and out width: their kept fractions.
            full = _Factor(1, 1, np.zeros(0, dtype=np.int64), [])  # an untabled width: always whole
            widths = [f or full for name in latency_table.layers for f in self._layers.get(name, (None, None))]
            self._widths = _Polynomial(0.0, [1.0] * len(widths), [[f] for f in widths])
        self.base_latency = float(self.latency(torch.ones(self.n))) if latency_table is not None else None

    # ------------------------------------------------------------------ masks
    def from_keep(self, keep: Tensor | Sequence[float]) -> Tensor:
        """The mask giving every channel of group ``g`` the keep fraction ``keep[g]`` (the
        cost is then a polynomial in the per-group fractions; differentiable in ``keep``)."""
        keep = torch.as_tensor(keep, dtype=torch.float64)
        return keep.repeat_interleave(torch.as_tensor(self.sizes))

    def mask_of(self, removed: Sequence[np.ndarray]) -> Tensor:
        """The binary mask of a removal (local channel indices per group, as ``select`` gives)."""
        m = torch.ones(self.n, dtype=torch.float64)
        idx = [off + np.asarray(r, dtype=np.int64) for off, r in zip(self.offsets, removed) if len(r)]
        if idx:
            m[torch.from_numpy(np.concatenate(idx))] = 0.0
        return m

    def mask_of_plan(self, plan: Any) -> Tensor:
        """The binary mask of a channel plan made on this graph (e.g. by :func:`prunekit.prune`,
        repairs included): a channel is removed when a sliced tensor dim drops its positions."""
        return self.mask_of(removed_channels(self.groups, plan))

    def flops(self, mask: Tensor) -> Tensor:
        """FLOPs (as ``count_flops`` counts them) with the channels of ``mask`` kept."""
        return self._flops(mask)

    def params(self, mask: Tensor) -> Tensor:
        """Parameter count with the channels of ``mask`` kept."""
        return self._params(mask)

    def latency(self, mask: Tensor) -> Tensor:
        """Estimated latency (ms) from the latency table: every tabled layer interpolated at
        its kept in/out width fractions, the whole model's measured time scaled by the sum
        (as :meth:`LatencyTable.estimate` does for a pruned model)."""
        table = self.latency_table
        if table is None:
            raise ValueError("cost model: latency needs latency_table=")
        full = sum(float(t.grid_ms[-1, -1]) for t in table.layers.values())
        fractions = self._widths.terms(mask).view(-1, 2)  # (in, out) kept fraction per tabled layer
        now = torch.zeros((), dtype=torch.float64)
        for (fin, fout), t in zip(fractions, table.layers.values()):
            now = now + _interp2(fin, fout, table.fractions, t.grid_ms)
        return now * (table.model_ms / full if full else 0.0)

    def measure(self, kind: str, mask: Tensor) -> Tensor:
        """``flops`` / ``params`` / ``latency`` by name."""
        return {"flops": self.flops, "params": self.params, "latency": self.latency}[kind](mask)

    def base(self, kind: str) -> float:
        """The unpruned value of ``kind``."""
        value = {"flops": self.base_flops, "params": self.base_params, "latency": self.base_latency}[kind]
        if value is None:
            raise ValueError("cost model: latency needs latency_table=")
        return float(value)

    # ------------------------------------------------------------------ building
    def _factor(self, lab: Tensor, dim: int) -> _Factor:
        key = (id(lab), dim)
        hit = self._cache.get(key)
        if hit is not None:
            return hit[1]
        a = lab.numpy() if isinstance(lab, Tensor) else np.asarray(lab)
        moved = np.moveaxis(a, dim, 0).reshape(a.shape[dim], -1)
        cells = self._chan[moved]
        fixed_rows = (cells < 0).any(axis=1)
        same = (cells == cells[:, :1]).all(axis=1)
        single = ~fixed_rows & same
        multi_rows = np.flatnonzero(~fixed_rows & ~same)
        f = _Factor(a.shape[dim], int(fixed_rows.sum()), cells[single, 0].copy(),
                    [np.unique(cells[r]) for r in multi_rows])
        self._cache[key] = (lab, f)  # holding the label keeps its id from being reused
        return f

    def _out_factors(self, lab: Tensor) -> list[_Factor]:
        return [self._factor(lab, d) for d in range(lab.ndim) if lab.shape[d] > 1]

    def _build_flops(self, ops: list[Any]) -> tuple[_Polynomial, dict[str, tuple[_Factor | None, _Factor | None]]]:
        coefs: list[float] = []
        factors: list[list[_Factor]] = []
        layers: dict[str, tuple[_Factor | None, _Factor | None]] = {}
        produced = {v: lab for op in ops for v, lab in zip(op.out_values, op.out_labs)}
        for op in ops:
            if op.name == "multi_head_attention_forward" and len(op.in_shapes) > 2:
                for flops, widths in mha_terms(op):  # heads and embedding scale different terms
                    coefs.append(float(flops))
                    factors.append([f for w in widths if (f := self._mha_factor(op, w, produced)) is not None])
                continue
            spec = op_cost(op)
            if spec is None:
                continue
            flops, contract_dim = spec
            out = self._out_factors(op.out_labs[0]) if op.out_labs else []
            fs = list(out)
            # The first input's label, as the op that produced it left it (None: a model input).
            lab_in = produced.get(op.in_values[0]) if op.in_values else None
            f_in = None
            if contract_dim is not None and lab_in is not None and lab_in.ndim:
                d = contract_dim % lab_in.ndim
                if lab_in.shape[d] > 1:
                    f_in = self._factor(lab_in, d)
                    fs.append(f_in)
            coefs.append(float(flops))
            factors.append(fs)
            if op.name in CONV_OPS or op.name == "linear":
                f_out = out[0] if len(out) == 1 else None
                layers.setdefault(op.module, (f_in if contract_dim is not None else f_out, f_out))
        return _Polynomial(0.0, coefs, factors), layers

    def _mha_factor(self, op: Any, width: str, produced: dict[int, Tensor]) -> _Factor | None:
        """The factor of one width of :func:`~prunekit.graph.opcost.mha_terms` (None: a width
        no channel of which can go)."""
        if width == "inner":
            lab = op.aux_labs.get("inner")
        elif width == "out":
            lab = op.out_labs[0] if op.out_labs else None
        else:
            v = op.in_values[("query", "key", "value").index(width)]
            lab = produced.get(v)
        if lab is None or lab.ndim == 0 or lab.shape[-1] == 1:
            return None
        return self._factor(lab, lab.ndim - 1)

    def _build_params(self, graph: Any, model: nn.Module) -> _Polynomial:
        dims: dict[str, dict[int, _Factor]] = {}
        for m in graph.members:
            per = dims.setdefault(m.tensor, {})
            if m.dim in per:
                continue  # the first member of a tensor dim is the one the plan slices by
            cells = self._chan[m.atoms]
            per[m.dim] = _Factor(len(cells), int((cells < 0).sum()), cells[cells >= 0].copy(), [])
        coefs, factors, const = [], [], 0.0
        seen: set[int] = set()
        for name, store, _, t in named_tensors(model, ("_parameters",)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if name in dims:
                coefs.append(float(t.numel()))
                factors.append(list(dims[name].values()))
            else:
                const += t.numel()
        return _Polynomial(const, coefs, factors)


def _interp1(x: Tensor, xs: Sequence[float], ys: Tensor) -> Tensor:
    """``np.interp`` in torch (clamped at the ends), differentiable in ``x``."""
    xs_t = torch.as_tensor(xs, dtype=torch.float64)
    # Clamped in value only: the edge segment's slope stays the gradient, so a full-width
    # layer (x at the top end) still tells how much narrowing it would save.
    x = x - (x - x.clamp(float(xs_t[0]), float(xs_t[-1]))).detach()
    i = torch.clamp(torch.searchsorted(xs_t, x.detach().reshape(1), right=True) - 1, 0, len(xs) - 2)[0]
    x0, x1 = xs_t[i], xs_t[i + 1]
    w = (x - x0) / (x1 - x0)
    return ys[..., i] * (1 - w) + ys[..., i + 1] * w


def _interp2(fi: Tensor, fo: Tensor, xs: Sequence[float], grid: np.ndarray) -> Tensor:
    """Bilinear interpolation of ``grid[in, out]`` (as ``LatencyTable.layer_ms`` does)."""
    g = torch.as_tensor(grid, dtype=torch.float64)
    rows = _interp1(fo, xs, g)  # one value per input fraction
    return _interp1(fi, xs, rows)
