"""The factorisable layers of a model: their singular values and what they cost, factorised or not.

A layer is factorisable in a ``kind`` (``"channel"`` or ``"spatial"``) when its handler gives a
rank matrix for it (:meth:`prunekit.handlers.LayerHandler.rank_matrix`). Its cost as it is
comes from the handler's FLOPs formula on the shapes of every call in one forward pass; the
cost of its factorised pair is linear in the rank (two layers whose widths are the rank, no
FLOPs in the bias), so it is measured once, at ranks 1 and 2, on meta-device copies (no
arithmetic, no copy of the weights).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.errors import PruningError
from prunekit.handlers import LayerHandler, handler_for
from prunekit.measure import count_flops
from prunekit.runtime import call_model, infer_device, model_mode, to_device

__all__ = ["KINDS", "RankLayer", "factorisable", "find_layers", "energy_rank", "threshold_rank", "round_rank"]

KINDS = ("channel", "spatial")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise PruningError(f"mode={kind!r}: 'channel' (k x k conv C->r, then 1x1 r->N; linear -> two linears) "
                           "or 'spatial' (k x 1 conv C->r, then 1 x k r->N)")
    return kind


def _ignored(name: str, ignore: Iterable[str]) -> bool:
    """``name`` is an ignored module or lies inside one."""
    return any(name == n or name.startswith(n + ".") for n in ignore)


def factorisable(model: nn.Module, kind: str, ignore: Iterable[str] = ()) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """``([(name, module)], left_alone)``: the modules of ``model`` whose handler factorises them
    in ``kind``, in module order, outside the ``ignore`` names; ``left_alone`` maps the other
    candidate names to why they are not (ignored, shared under several names)."""
    _check_kind(kind)
    ignore = tuple(ignore)
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    found, left = [], {}
    for name, m in model.named_modules():
        handler = handler_for(m)
        if not name or handler is None or handler.rank_matrix(m, kind) is None:
            continue
        if _ignored(name, ignore):
            left[name] = "ignored"
        elif counts[id(m)] > 1:
            # A Replace step at one name would leave the other references to the old module.
            left[name] = "shared under several names"
        else:
            found.append((name, m))
    return found, left


@dataclass
class RankLayer:
    """One factorisable layer: its name, module, handler and kind, the singular values of its
    rank matrix (float64, CPU, descending), its FLOPs (over every call of one forward) and
    parameters as it is, and the cost of its factorised pair: ``flops_per_rank * r`` FLOPs and
    ``params_per_rank * r + params_fixed`` parameters at rank ``r``."""

    name: str
    module: nn.Module
    handler: LayerHandler
    kind: str
    sigma: Tensor
    flops: int
    params: int
    flops_per_rank: int
    params_per_rank: int
    params_fixed: int

    @property
    def full_rank(self) -> int:
        """The number of singular values (the smaller side of the rank matrix)."""
        return len(self.sigma)

    def cost(self, what: str, rank: int | None) -> int:
        """FLOPs (``what="flops"``) or parameters (``"params"``) at ``rank``; None: unfactorised."""
        if what == "flops":
            return self.flops if rank is None else self.flops_per_rank * rank
        return self.params if rank is None else self.params_per_rank * rank + self.params_fixed

    def profitable(self, rank: int, what: str = "flops") -> bool:
        """Whether the factorised pair at ``rank`` costs less than the layer as it is."""
        return self.cost(what, rank) < self.cost(what, None)

    def tail_energy(self, rank: int) -> float:
        """Fraction of the squared Frobenius norm the best rank-``rank`` approximation
        discards: ``sum_{i > r} s_i^2 / sum_i s_i^2`` (0 for an all-zero weight)."""
        e = self.sigma.square()
        total = float(e.sum())
        return float(e[rank:].sum()) / total if total > 0 else 0.0

    def factorise(self, rank: int) -> nn.Module:
        """The factorised pair at ``rank`` (from the handler, with the layer's current weights)."""
        pair = self.handler.factorise(self.module, rank, kind=self.kind)
        assert pair is not None  # factorisable() only lists layers whose handler factorises them
        return pair


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the meta device, made without copying the weights' data."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _pair_cost(handler: LayerHandler, meta: nn.Module, kind: str, rank: int,
               inputs: list[tuple[tuple[int, ...], torch.dtype]]) -> tuple[int, int]:
    """(FLOPs over the recorded input shapes and dtypes, parameters) of the meta pair at ``rank``."""
    pair = handler.factorise(meta, rank, kind=kind)
    assert pair is not None
    flops = sum(count_flops(pair, torch.empty(s, dtype=d, device="meta"), meta=True) for s, d in inputs)
    return flops, sum(p.numel() for p in pair.parameters())


def find_layers(model: nn.Module, example_inputs: Any, kind: str,
                ignore: Iterable[str] = ()) -> tuple[list[RankLayer], dict[str, str]]:
    """The factorisable layers of ``model`` (see :func:`factorisable`) that run in one eval
    forward on ``example_inputs``, in the order they first run, with their singular values
    and costs; and ``left_alone``: name -> reason for every candidate left out (ignored,
    shared, not called, rank 1). Hooks are removed and modes restored afterwards."""
    candidates, left = factorisable(model, kind, ignore)
    calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype]]] = {}
    order: list[str] = []

    def recorder(name: str) -> Any:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if name not in calls:
                order.append(name)
            calls.setdefault(name, []).append((tuple(args[0].shape), tuple(out.shape), args[0].dtype))
        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in candidates]
    try:
        with model_mode(model, "eval"), torch.no_grad():
            call_model(model, to_device(example_inputs, infer_device(model, example_inputs)))
    finally:
        for h in handles:
            h.remove()
    modules = dict(candidates)
    for name in modules:
        if name not in calls:
            left[name] = "not called in the forward pass"
    layers = []
    for name in order:
        m = modules[name]
        handler = handler_for(m)
        assert handler is not None
        matrix = handler.rank_matrix(m, kind)
        assert matrix is not None
        sigma = torch.linalg.svdvals(matrix.detach().double()).cpu()
        if len(sigma) < 2:
            left[name] = "its rank matrix has rank 1 at most: nothing to remove"
            continue
        inputs = [(s, d) for s, _, d in calls[name]]
        meta = _meta_copy(m)
        (f1, p1), (f2, p2) = (_pair_cost(handler, meta, kind, r, inputs) for r in (1, 2))
        layers.append(RankLayer(
            name=name, module=m, handler=handler, kind=kind, sigma=sigma,
            flops=sum(handler.flops(m, i, o) for i, o, _ in calls[name]), params=handler.params(m),
            flops_per_rank=f2 - f1, params_per_rank=p2 - p1, params_fixed=2 * p1 - p2))
    return layers, left


def energy_rank(sigma: Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep at least ``energy`` of the squared sum:
    ``min r`` with ``sum_{i <= r} s_i^2 >= energy * sum_i s_i^2`` (TRP's energy threshold on
    eigenvalues, i.e. squared singular values); at least 1."""
    e = sigma.double().square()
    total = float(e.sum())
    if total <= 0:
        return 1
    kept = torch.cumsum(e, 0) / total
    # A tiny tolerance: energy=1.0 must give the numerical rank, not fail on rounding.
    return max(1, int((kept < energy - 1e-12).sum()) + 1)


def threshold_rank(sigma: Tensor, threshold: float) -> int:
    """The number of singular values at or above ``threshold`` (TRP's value threshold); at least 1."""
    return max(1, int((sigma >= threshold).sum()))


def round_rank(rank: int, round_to: int, full_rank: int) -> int:
    """``rank`` rounded up to a multiple of ``round_to``, at most ``full_rank``."""
    return min(full_rank, -(-rank // round_to) * round_to)
