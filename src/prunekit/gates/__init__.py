"""Channel gates: one learned multiplier vector per coupled group, trained inside the model.

:func:`attach_gates` puts a gate on every prunable group of a traced model. The gate
multiplies the group's channels wherever they are made: after the group's normalisation
layers (a scale before BatchNorm would be normalised away) and at producers whose output
is not normalised by them on every path (through concats, sums, activations...), so each
channel is scaled once on its way to any consumer and residual-coupled channels (every conv
feeding one sum) share one gate. Each gate is a real submodule, ``prunekit_gate`` of the first layer it
scales (``prunekit_gate_<group index>``; not of the root, which an ``nn.Sequential`` would
run as a layer), so
``.parameters()``, ``state_dict``, checkpoints, DDP and ``torch.compile`` see it;
:meth:`GateSet.detach` restores the original module tree, and :meth:`GateSet.fold` first multiplies the gate
values into the layers they scale, so the detached model computes what the gated one did.
Gate values then become the scores of the ordinary allocator (:func:`prune_with_gates`),
so budgets, ``round_to``, ``min_channels`` and ``ignore`` hold as for any criterion.

Gate kinds are registry plug-ins (:func:`register_gate`): ``scale`` (a plain multiplier
starting at 1, the original function exactly), ``logit`` (``sigmoid(logit / T)`` with a
temperature buffer that schedules can anneal), ``scp`` (a relaxed-Bernoulli mask driven
by the probability that a BatchNorm -> ReLU pair passes the channel, :mod:`prunekit.gates.scp`),
``mask`` (a fixed multiplier set from outside, no parameter: a hard 0/1 structure per step,
:mod:`prunekit.gates.mask`) and ``two_temperature`` (a relaxed-Bernoulli mask whose selection
probability ``sigmoid(logit / T_select)`` has its own temperature besides the sampling one,
:mod:`prunekit.gates.two_temperature`).
Stochastic kinds keep their expectation apart (:meth:`Gate.expected_values`): it is what
:meth:`GateSet.mask` gives the cost model and what :meth:`GateSet.fold` folds.
Input-dependent kinds (``input_dependent = True``: ``se``, squeeze-excitation,
:mod:`prunekit.gates.se`; ``autopruner``, :mod:`prunekit.gates.autopruner`) override
:meth:`Gate.multiplier`, which then receives the site's activation restricted to the group's
channels, and may return one scale per sample; they are not foldable (or only approximately,
by their per-site mean: ``fold(approximate=True)``). A gate learns its sites at attachment
(:meth:`Gate.on_attach`, in forward order), so a kind may keep state per site.
``attach_gates(..., at="producers")`` puts the gates at every producer's output instead, before
any normalisation (where squeeze-excitation blocks sit in their papers).

>>> import torch, torchvision, prunekit as pk
>>> from prunekit.gates import attach_gates
>>> m = torchvision.models.resnet18().eval(); x = torch.randn(1, 3, 64, 64)
>>> gates = attach_gates(m, pk.trace(m, x, ignore=[m.fc]), kind="scale")
>>> sum(p.numel() for p in gates.parameters()) == sum(g.size for g in gates.groups)
True
>>> [n for n, _ in m.bn1.named_children()]
['prunekit_gate_0']
>>> gates.detach(); [n for n, _ in m.bn1.named_children()]
[]
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.errors import PruningError
from prunekit.registry import Registry

__all__ = ["Gate", "GateSet", "attach_gates", "gate_kinds", "prune_with_gates", "register_gate"]

GATES: Registry[type["Gate"]] = Registry("gate kind")
GATE_PREFIX = "prunekit_gate_"  # child name of a gate in the layer holding it: prunekit_gate_<group index>


def register_gate(name: str) -> Callable[[type["Gate"]], type["Gate"]]:
    """Class decorator registering a :class:`Gate` subclass as kind ``name``."""
    return GATES.register(name)


def gate_kinds(pattern: str = "*") -> list[str]:
    """Names of the registered gate kinds matching a glob pattern."""
    return GATES.names(pattern)


class Gate(nn.Module):
    """A gate over ``size`` channels. Subclasses define :meth:`values` (input-independent
    multipliers) or override :meth:`multiplier` (input-dependent ones: then ``input_dependent``
    is True and ``foldable`` False); :meth:`importance` is what the allocator ranks (default:
    the values)."""

    foldable = True
    # True: multiplier() reads the activation (the hook then hands it the group's channels only).
    input_dependent = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def on_attach(self, sites: int) -> None:
        """Called once by :func:`attach_gates` before the gate is moved to the model's device,
        with the number of places it multiplies (numbered 0.. in forward order, the ``site``
        of :meth:`multiplier`); kinds with state per site create it here. Default: nothing."""

    def values(self) -> Tensor:
        """The per-channel multipliers, shape ``(size,)``."""
        raise NotImplementedError

    def multiplier(self, x: Tensor, dim: int, site: int = 0) -> Tensor:
        """Per-channel multipliers at site number ``site`` for activation ``x`` whose channels
        lie along ``dim``: shape ``(size,)`` (same for every sample) or ``(batch, size)``. For
        an ``input_dependent`` kind, ``x`` holds exactly the gate's channels along ``dim``, in
        gate order (a channel the site does not carry is 0); otherwise it is the site's whole
        output. Default: :meth:`values`."""
        return self.values()

    def expected_values(self) -> Tensor:
        """The expectation of :meth:`values` over the gate's own randomness, shape ``(size,)``:
        the values themselves for deterministic kinds (the default); a stochastic kind (a
        sampled mask) returns its mean, which the cost model and :meth:`GateSet.fold` use; an
        input-dependent kind returns its per-channel mean over the data it has seen."""
        return self.values()

    def site_expected_values(self, site: int) -> Tensor:
        """What :meth:`GateSet.fold` multiplies into site number ``site``, shape ``(size,)``:
        :meth:`expected_values` (the default); a kind with one block per site returns that
        site's own mean."""
        return self.expected_values()

    def importance(self) -> np.ndarray:
        """Channel scores for allocation (higher = keep)."""
        return self.values().detach().double().cpu().numpy()

    def set_identity(self) -> None:
        """Make the gate multiply by exactly 1 (after :meth:`GateSet.fold` moved its values
        into the layers). Kinds that cannot raise :class:`PruningError` (the default)."""
        raise PruningError(f"gate kind {type(self).__name__} cannot be set to 1 after folding")


@register_gate("scale")
class ScaleGate(Gate):
    """A plain learned multiplier per channel, starting at ``init`` (1: the original function)."""

    def __init__(self, size: int, *, init: float = 1.0) -> None:
        super().__init__(size)
        self.weight = nn.Parameter(torch.full((size,), float(init)))

    def values(self) -> Tensor:
        """The multipliers themselves."""
        return self.weight

    def importance(self) -> np.ndarray:
        """|multiplier| (a negative scale keeps a channel as much as a positive one)."""
        return self.weight.detach().abs().double().cpu().numpy()

    @torch.no_grad()
    def set_identity(self) -> None:
        """Multipliers back to 1."""
        self.weight.fill_(1.0)


@register_gate("logit")
class LogitGate(Gate):
    """``sigmoid(logit / temperature)`` per channel: a soft mask in (0, 1). The logit starts
    at ``init`` (3: 0.95 at T=1); the temperature is a buffer, so a schedule can anneal it
    (towards a hard mask) and checkpoints keep it."""

    def __init__(self, size: int, *, init: float = 3.0, temperature: float = 1.0) -> None:
        super().__init__(size)
        self.logit = nn.Parameter(torch.full((size,), float(init)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def values(self) -> Tensor:
        """The soft mask."""
        return torch.sigmoid(self.logit / self.temperature)

    def importance(self) -> np.ndarray:
        """``logit / temperature``: ranks the channels as the mask does, without the ties a
        saturated sigmoid makes once the temperature is annealed towards 0."""
        return (self.logit.detach().double() / self.temperature.double()).cpu().numpy()

    @torch.no_grad()
    def set_identity(self) -> None:
        """``logit = inf``: sigmoid(inf) = 1 at any temperature."""
        self.logit.fill_(float("inf"))


class _Site:
    """Where a gate multiplies: module ``name``'s output along the channel dim its handler
    names; ``index[i]`` is the gate entry for output position ``i`` (``size`` for positions
    of other groups, which get factor 1); ``number`` is the site's place among its gate's
    sites (forward order)."""

    def __init__(self, group: int, name: str, module: nn.Module, index: np.ndarray, handler: Any,
                 number: int = 0, position: int = 0) -> None:
        self.group, self.name, self.module, self.handler, self.number = group, name, module, handler, number
        self.position = position  # index of the module's first op in the eval trace
        self.weight_dims = handler.weight_dims(module)
        self.index = torch.as_tensor(index, dtype=torch.long)
        self.norm: nn.Module | None = None  # the norm that alone reads the output, directly (_direct_norms)


class _GateHook:
    """Forward hook multiplying a site's output by its gate (a plain object, so deep copies
    of a gated model carry hooks bound to the copied gates). For an input-dependent gate it
    first gathers the gate's channels (``gather[c]``: the output position of gate channel
    ``c``, or the number of positions when the site lacks it, read as 0)."""

    def __init__(self, gate: Gate, index: Tensor, handler: Any, site: int = 0) -> None:
        self.gate, self.index, self.handler, self.site = gate, index, handler, site
        positions = len(index)
        gather = torch.full((gate.size,), positions, dtype=torch.long)
        for i, c in reversed(list(enumerate(index.tolist()))):  # the first position carrying c wins
            if c < gate.size:
                gather[c] = i
        self.gather, self.complete = gather, bool((gather < positions).all())

    def _gate_channels(self, out: Tensor, dim: int) -> Tensor:
        """``out`` restricted to the gate's channels along ``dim``, in gate order."""
        if not self.complete:
            pad = list(out.shape)
            pad[dim] = 1
            out = torch.cat([out, out.new_zeros(pad)], dim=dim)
        return out.index_select(dim, self.gather.to(out.device))

    def __call__(self, module: nn.Module, args: Any, out: Tensor) -> Tensor:
        dim = self.handler.out_channel_dim(module, out.ndim) % out.ndim
        x = self._gate_channels(out, dim) if self.gate.input_dependent else out
        mult = self.gate.multiplier(x, dim, self.site)
        ones = mult.new_ones(mult.shape[:-1] + (1,))
        full = torch.cat([mult, ones], dim=-1).index_select(-1, self.index.to(mult.device))
        shape = [1] * out.ndim
        shape[dim] = full.shape[-1]
        if full.ndim == 2:  # per-sample multipliers
            shape[0] = full.shape[0]
        return out * full.reshape(shape).to(out.dtype)


class GateSet(nn.Module):
    """The gates of one model (``gates[str(group.index)]``) and the hooks that apply them."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleDict()
        self.groups: list[Any] = []
        self.ungated: list[str] = []  # prunable groups no gate site was found for
        self._sites: list[_Site] = []
        self._handles: list[Any] = []
        self._owners: list[nn.Module] = []  # layers holding a gate as ``prunekit_gate``

    def gate(self, group_index: int) -> Gate:
        """The gate of group ``group_index`` (KeyError if it has none)."""
        return self.gates[str(group_index)]  # type: ignore[return-value]

    def sites(self, group_index: int) -> list[tuple[str, nn.Module, Tensor]]:
        """Where group ``group_index``'s gate multiplies: ``(module name, module, index)`` per
        site in forward order (site number 0 first), ``index[i]`` the gate entry of the
        module's output position ``i`` along its channel dim (the gate's size for positions of
        other groups)."""
        return [(s.name, s.module, s.index) for s in self._sites if s.group == group_index]

    def forward_order(self) -> list[Any]:
        """The gated groups, ordered by where their first site runs in the forward pass."""
        first = {s.group: s.position for s in self._sites if s.number == 0}
        return sorted((g for g in self.groups if g.index in first), key=lambda g: first[g.index])

    def scores(self, groups: list[Any]) -> list[np.ndarray | None]:
        """Importance per channel for every group of ``groups`` (None for a group without a gate)."""
        return [self.gates[str(g.index)].importance() if str(g.index) in self.gates else None  # type: ignore[operator]
                for g in groups]

    def mask(self, groups: list[Any]) -> Tensor:
        """The expected gate values (:meth:`Gate.expected_values`) of every channel of
        ``groups`` concatenated (1 for ungated groups), as float64 on the CPU: the keep mask
        the cost model (:class:`prunekit.allocate.cost.CostModel`, a CPU model) takes,
        differentiable in the gates (input-dependent kinds give their per-channel mean over the
        data they have seen)."""
        parts = []
        for g in groups:
            key = str(g.index)
            parts.append(self.gates[key].expected_values() if key in self.gates  # type: ignore[operator]
                         else torch.ones(g.size))
        # .to() is differentiable, so gates on a GPU still get the cost's gradient.
        return torch.cat([p.to("cpu", torch.float64) for p in parts])

    @torch.no_grad()
    def fold(self, approximate: bool = False) -> None:
        """Multiply every gate's values into the layers it scales (the output slices of a
        producer's weight and bias, a norm's affine weight and bias; for a producer whose
        output only a batch norm reads, directly, that norm's running statistics instead:
        :meth:`~prunekit.handlers.LayerHandler.absorb_input_scale`), so that the model
        computes the same function once the gates are detached; then set every gate to 1
        (:meth:`Gate.set_identity`). Stochastic gates fold their expectation
        (:meth:`Gate.expected_values`). Input-dependent gates raise PruningError unless
        ``approximate``, which folds each site's mean (:meth:`Gate.site_expected_values`): the
        per-sample variation is lost. Also raises PruningError for a site without an affine
        weight."""
        from prunekit.handlers import handler_for

        # Every gate's values are taken before any layer changes: a kind whose values are
        # computed from the layers it scales (``scp`` reads its BatchNorm) must not see a
        # half-folded model.
        folded: dict[tuple[int, int], Tensor] = {}
        for site in self._sites:
            gate = self.gate(site.group)
            if not gate.foldable and not (approximate and gate.input_dependent):
                raise PruningError(f"gate of group {site.group}: kind {type(gate).__name__} depends on the input "
                                   "and cannot be folded; detach without folding (or fold(approximate=True) to "
                                   "fold its mean)")
            folded[site.group, site.number] = gate.site_expected_values(site.number).detach()
        for site in self._sites:
            out_dim = site.weight_dims[0]
            weight = getattr(site.module, "weight", None)
            if out_dim is None or not isinstance(weight, Tensor):
                raise PruningError(f"gate at '{site.name}': the module has no weight to fold the gate into")
            vals = folded[site.group, site.number]
            vals = torch.cat([vals, vals.new_ones(1)]).index_select(0, site.index.to(vals.device))
            # A producer normalised by a batch norm right after: the norm's statistics absorb the
            # scale, so the weights keep their trained size. Scaled into the weights instead, they
            # would shrink (SE means ~0.5), and under the norm's scale invariance every later
            # training step would act as one at a 1/scale**2 times larger LR.
            if site.norm is not None and handler_for(site.norm).absorb_input_scale(site.norm, vals):
                continue
            shape = [1] * weight.ndim
            shape[out_dim] = -1
            weight.mul_(vals.view(shape).to(weight))
            bias = getattr(site.module, "bias", None)
            if isinstance(bias, Tensor):
                bias.mul_(vals.to(bias))
        for gate in self.gates.values():
            gate.set_identity()  # type: ignore[operator]  # the folded model stays exact while attached

    def detach(self) -> None:
        """Remove the hooks and the ``prunekit_gate_*`` submodules: the original module tree."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for owner in self._owners:
            for key in [k for k in owner._modules if k.startswith(GATE_PREFIX)]:
                del owner._modules[key]
        self._owners.clear()


_NORM_OPS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"})


def _readers(ops: list[Any]) -> dict[int, list[Any]]:
    """Value id -> the ops of ``ops`` that read it, in trace order."""
    readers: dict[int, list[Any]] = {}
    for op in ops:
        for v in op.in_values:
            if v >= 0:
                readers.setdefault(v, []).append(op)
    return readers


def _first_layers(model: nn.Module, graph: Any) -> dict[str, tuple[frozenset[str], bool]]:
    """Module name -> ``(layers, escapes)`` of what its output reaches (eval trace): the
    modules of the first *layers* met along every dataflow path from the values the module
    hands to other modules (a layer: a module with a handler, or a weighted or normalising op,
    which consumes the channels), and whether some path reaches a model output without
    meeting one. Ops that are not layers (concat, sum, activations, pooling, reshapes) pass the
    channels on and are walked through."""
    from prunekit.graph.tracer import WEIGHTED_OPS
    from prunekit.handlers import handler_for

    ops = graph.ops("eval")
    consumers = _readers(ops)
    layer_of: dict[str, bool] = {}

    def is_layer(op: Any) -> bool:
        if op.name in WEIGHTED_OPS or op.name in _NORM_OPS:
            return True
        if op.module not in layer_of:
            mod = model.get_submodule(op.module) if op.module else model
            layer_of[op.module] = handler_for(mod) is not None
        return layer_of[op.module]

    # Ops are recorded in execution order, so a value's consumers come after its producer:
    # walking the ops backwards, every consumer's outputs are resolved before they are needed.
    reach: dict[int, tuple[frozenset[str], bool]] = {}
    for op in reversed(ops):
        for v in op.out_values:
            layers: set[str] = set()
            escapes = v not in consumers
            for c in consumers.get(v, []):
                if c.module == op.module:
                    # Inside the same module (a layer's own ops, a functional forward): walk on.
                    pass
                elif is_layer(c):
                    layers.add(c.module)
                    continue
                for w in c.out_values:
                    more, out = reach.get(w, (frozenset(), False))
                    layers |= more
                    escapes |= out
            reach[v] = (frozenset(layers), escapes)
    result: dict[str, tuple[set[str], bool]] = {}
    for op in ops:
        layers, escapes = result.setdefault(op.module, (set(), False))
        for v in op.out_values:
            # Only what leaves the module: its ops that feed each other are walked through above.
            if v in consumers and all(c.module == op.module for c in consumers[v]):
                continue
            more, out = reach[v]
            layers |= more
            escapes = escapes or out
        result[op.module] = (layers, escapes)
    return {name: (frozenset(layers), escapes) for name, (layers, escapes) in result.items()}


def _direct_norms(model: nn.Module, graph: Any) -> dict[str, str]:
    """Module name -> the norm module that alone reads its output, directly: the module's one
    value read outside it goes to one op only, the norm's (a norm module with a handler, run
    once in the trace), as its first input. There a per-channel scale of the output can be
    absorbed by the norm (no concat, reshape or second reader in between)."""
    from prunekit.handlers import handler_for

    ops = graph.ops("eval")
    readers = _readers(ops)
    runs: dict[str, int] = {}
    for op in ops:
        runs[op.module] = runs.get(op.module, 0) + 1
    leaving: dict[str, list[int]] = {}
    for op in ops:
        for v in op.out_values:
            if any(c.module != op.module for c in readers.get(v, [])):
                leaving.setdefault(op.module, []).append(v)
    out: dict[str, str] = {}
    for name, values in leaving.items():
        if len(values) != 1 or len(readers[values[0]]) != 1:
            continue
        op = readers[values[0]][0]
        if op.name not in _NORM_OPS or runs[op.module] != 1 or not op.in_values or op.in_values[0] != values[0]:
            continue
        handler = handler_for(model.get_submodule(op.module) if op.module else model)
        if handler is not None and handler.is_norm:
            out[name] = op.module
    return out


def _forward_order(graph: Any) -> dict[str, int]:
    """Module name -> the index of its first op in the eval trace (execution order)."""
    order: dict[str, int] = {}
    for i, op in enumerate(graph.ops("eval")):
        order.setdefault(op.module, i)
    return order


def _sites(model: nn.Module, group: Any, reach: dict[str, tuple[frozenset[str], bool]],
           at: str = "auto") -> list[tuple[str, nn.Module, np.ndarray, Any]]:
    """(module name, module, gate index per output position, its handler) of every place
    group ``group``'s gate multiplies (``reach`` from :func:`_first_layers`): with
    ``at="auto"`` the group's norms and the producers whose output is not normalised by them
    on every path, with ``at="producers"`` every producer (before any norm). A producer that
    reaches one of the norms on one path and another layer or a model output on another is
    gated at its output too: no one site scales its channels exactly once on both paths. A
    producer whose forward never runs in the trace (``nn.MultiheadAttention.out_proj``, whose
    weight the attention uses directly) is no site: a hook there would never scale anything,
    and folding into it would change the model."""
    from prunekit.handlers import handler_for

    norms, producers = {}, {}
    for m in group.members:
        name, _, leaf = m.tensor.rpartition(".")
        if leaf != "weight":
            continue
        mod = model.get_submodule(name) if name else model
        h = handler_for(mod)
        if h is None:
            continue
        if m.role == "norm" and h.is_norm:
            norms.setdefault(name, (mod, m.channel, h))
        elif m.role == "out" and h.out_channel_dim(mod, 2) is not None and h.weight_dims(mod)[0] is not None \
                and name in reach:  # a layer whose forward never runs (an attention's out_proj) holds no gate
            producers.setdefault(name, (mod, m.channel, h))
    if at == "producers":
        norms, covered = {}, set()
    else:
        # A producer is gated by the group's norms when every path from its output meets one
        # of them first (directly, or through a concat, a sum, an activation...): gating it at
        # its own output as well would scale its channels twice on the way through the norm.
        covered = set()
        for p in producers:
            layers, escapes = reach.get(p, (frozenset(), True))
            if layers and not escapes and layers <= norms.keys():
                covered.add(p)
    out = []
    for name, (mod, chan, h) in list(norms.items()) + [(n, v) for n, v in producers.items() if n not in covered]:
        out.append((name, mod, np.where(chan >= 0, chan, group.size), h))
    return out


def attach_gates(model: nn.Module, graph: Any, *, kind: str = "logit", groups: list[Any] | None = None,
                 at: str = "auto", **kind_kwargs: Any) -> GateSet:
    """Attach a gate of ``kind`` to every prunable group of ``graph`` (or of ``groups``) on
    ``model`` (the traced model, changed in place) and return the :class:`GateSet`, also
    each gate registered as ``prunekit_gate_<group index>`` of its group's first gated layer
    (its first norm, if any). ``at`` says where a gate multiplies: ``"auto"`` after the group's
    normalisation layers and at producers that reach none, ``"producers"`` at every
    producer's output (before its norm: for input-dependent kinds placed there by their
    paper). ``kind_kwargs`` go to the gate constructor; the gate then learns its number of
    sites (:meth:`Gate.on_attach`). Raises PruningError when the model already has gates,
    ``kind`` is unknown or ``at`` is neither."""
    if any(k.startswith(GATE_PREFIX) for m in model.modules() for k in m._modules):
        raise PruningError("attach_gates: the model already has gates (detach them first)")
    if at not in ("auto", "producers"):
        raise PruningError(f"attach_gates: at={at!r}; expected 'auto' or 'producers'")
    try:
        cls = GATES.get(kind)
    except KeyError as exc:
        raise PruningError(f"attach_gates: {exc.args[0]}") from None
    gs = GateSet()
    gs.groups = [g for g in (groups if groups is not None else graph.groups) if g.n_prunable > 0]
    reach = _first_layers(model, graph)
    direct = _direct_norms(model, graph)
    order = _forward_order(graph)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    for g in gs.groups:
        sites = _sites(model, g, reach, at)
        if not sites:
            gs.ungated.append(g.name)
            continue
        gate = cls(g.size, **kind_kwargs)
        gate.on_attach(len(sites))
        gate = gate.to(device)
        gs.gates[str(g.index)] = gate
        # The holder is the first site found (a norm, if any): where checkpoints expect the gate.
        sites[0][1].add_module(f"{GATE_PREFIX}{g.index}", gate)  # one layer can hold the gates of several groups
        gs._owners.append(sites[0][1])
        # Sites are numbered in forward order, so a kind with per-site state meets site 0 first in every pass.
        sites.sort(key=lambda s: order.get(s[0], len(order)))
        for number, (name, mod, index, handler) in enumerate(sites):
            site = _Site(g.index, name, mod, index, handler, number, order.get(name, len(order)))
            if name in direct:
                site.norm = model.get_submodule(direct[name])
            gs._sites.append(site)
            gs._handles.append(mod.register_forward_hook(_GateHook(gate, site.index, handler, number)))
    return gs


def prune_with_gates(model: nn.Module, example_inputs: Any, gates: GateSet, graph: Any, *, fold: bool = True,
                     **prune_options: Any) -> tuple[nn.Module, Any]:
    """Detach ``gates`` from ``model`` (folding their values into the layers first, unless
    ``fold`` is False) and prune it with the gate values as channel scores under the usual
    options (``ratio`` or a ``target_*`` budget, ``round_to``, ``min_channels``, ``ignore``
    via the graph); groups without a gate are ranked by the ``l2`` criterion. Returns
    ``(pruned model, plan)``; ``model`` is left without gates."""
    from prunekit.criteria import get as criterion

    l2 = criterion("l2")
    scores = {g.index: s if s is not None else l2(model, g)
              for g, s in zip(graph.groups, gates.scores(list(graph.groups)))}
    if fold:
        gates.fold()
    gates.detach()
    import prunekit as pk

    def gates(m: nn.Module, g: Any, **ctx: Any) -> np.ndarray:
        """The learned gate values (the plan's criterion label)."""
        return scores[g.index]

    return pk.prune(model, example_inputs, graph=graph, criterion=gates, return_plan=True, **prune_options)


# The kinds in their own modules register themselves; they subclass Gate, so they come last.
from prunekit.gates import autopruner as _autopruner  # noqa: E402,F401
from prunekit.gates import mask as _mask  # noqa: E402,F401
from prunekit.gates import scp as _scp  # noqa: E402,F401
from prunekit.gates import se as _se  # noqa: E402,F401
from prunekit.gates import two_temperature as _two_temperature  # noqa: E402,F401
