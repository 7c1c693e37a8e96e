"""Layer pruning via fusible residual convolutions, ResConv (Xu, Cao, Shang, Sun, Li 2020).

What the paper does (arXiv 2011.14356; our sources are its abstract and summaries, not the
full text), and how this module does it:

  1. **Convert.** Every convolution becomes a ResConv: a shortcut with a trainable layer
     scaling factor ``s`` around the layer, ``y = s * Conv(x) + x``. Here every conv whose
     output is shaped like its input (``in_channels == out_channels``, stride 1, an odd kernel
     with centred padding; any grouping: its handler's ``identity_weight``) becomes a
     :class:`~prunekit.surgery.factories.ResidualConv` through a ``Replace`` step, so the
     factor is a parameter of the model (``<conv>.scale``): it is in ``state_dict``, in every
     checkpoint and in the optimizer. A batch norm that reads only the conv's output moves
     into the branch (``y = x + s * BN(Conv(x))``; its old place becomes an identity), as
     the fusion below needs; the activation that followed stays where it was, after the add:
     ``act(x + s * BN(Conv(x)))``. Our sources do not show the paper's block figure; this is
     the only placement under which a block fuses into one conv exactly, which the paper
     claims (the branch must be affine: ``x + s * act(BN(Conv x))`` is not one conv), and the
     one RepVGG uses for the same fusion. The factor starts at ``init_scale`` (1).
  2. **Train with L1 on the factors.** The network trains with ``l1 * sum |s|`` added to
     the loss (sub-gradient ``l1 * sign(s)``), through :func:`prunekit.recover.train` with a
     :class:`~prunekit.recover.callbacks.Callback` (checkpoints and exact resume included).
  3. **Remove.** A layer whose ``|s|`` falls below ``threshold`` is removed: its block is
     ``act(x + 0)``, so the conv and its batch norm become identities (``Drop`` steps) and the
     activation stays (exactly the network with that factor set to 0).
  4. **Fuse.** Every other block becomes one ordinary conv: the batch norm is folded into the
     conv (running statistics), the result scaled by ``s``, and the identity added at the
     kernel centre (``W' = s * a * W + I``, ``b' = s * (a * b + c)`` for the norm's eval
     affine ``a x + c``): a ``Replace`` step with a plain conv, so inference costs nothing
     extra and the plan saves and loads without the wrapper.

Besides the threshold, ``target_flops`` / ``target_params`` choose how many layers go: the
fewest, in order of ``|s|``, whose removal keeps at most the target (bisection over the
measured fused model, see :func:`prunekit.allocate.units.smallest_prefix`); ``res.info``
records how close it landed and whether it is within 2%. An explicit ``ratio=`` removes that
fraction of the eligible layers, smallest factors first.

Departures from the paper:

  * Only the abstract is available to us: the initial factor, the L1 weight and the
    threshold are our defaults (``init_scale=1``, ``l1=1e-3``, ``threshold=1e-2``), not the
    paper's values.
  * The paper trains the ResConv network (from scratch, we believe); here the conversion is
    applied to a given, usually trained network and fine-tuned (the training-method
    convention: SGD, lr 0.01, cosine, weight decay 5e-4, which the factors get too, on top of
    the L1 term). Adding the shortcut changes the trained network's function until training
    adapts it.
  * A removed layer's activation stays (``act(x)``: exactly the network with ``s = 0``),
    although after a ReLU it is a no-op that could go as well (not done: kept exact).
  * Layers that change the shape (strided or widening convs, the stem) cannot take an
    identity shortcut and stay plain (the paper converts "convolutional layers"; which ones
    is not in our sources). The target options are ours.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

import prunekit as pk
from prunekit.allocate.budget import make_budget
from prunekit.allocate.units import budget_report, check_target_kind, smallest_prefix
from prunekit.config import PruneConfig
from prunekit.errors import PruningError
from prunekit.graph import DependencyGraph, module_names, under
from prunekit.handlers import handler_for
from prunekit.measure import count_flops, count_params
from prunekit.methods import MethodResult, budget_config, register
from prunekit.plan import Drop, PruningPlan, Step
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig
from prunekit.recover.train import train
from prunekit.runtime import output_tensors
from prunekit.surgery import apply_plan
from prunekit.surgery.factories import ResidualConv, build, describe
from prunekit.surgery.replace import replace_step

log = logging.getLogger(__name__)

__all__ = ["FactorL1", "ResConvOptions", "Site", "choose_removed", "convert", "factors", "finalize", "find_sites", "fuse",
           "removal_order", "resconv", "wrap_plan"]


@dataclasses.dataclass(frozen=True)
class ResConvOptions:
    """ResConv's own knobs: the L1 weight on the layer factors, the removal threshold on
    ``|s|`` and the factors' initial value. Checked on construction (ValueError naming the
    option)."""

    l1: float = 1e-3
    threshold: float = 1e-2
    init_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("l1", "threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"resconv: {name}={v!r} must be a finite number >= 0")
        if not isinstance(self.init_scale, (int, float)) or not math.isfinite(self.init_scale):
            raise ValueError(f"resconv: init_scale={self.init_scale!r} must be a finite number")


@dataclasses.dataclass(frozen=True)
class Site:
    """A conv that takes a shortcut (``conv``, a qualified name) and the batch norm that
    moves into its branch (``norm``; None when its output does not go to one norm alone)."""

    conv: str
    norm: str | None


def find_sites(model: nn.Module, graph: DependencyGraph, ignore: tuple[str, ...] = ()) -> tuple[list[Site], dict[str, str]]:
    """The convs of ``model`` that can become ResConv blocks, in execution order, and the
    reason every other filter layer (conv, linear) cannot, by name. A site's layer is called
    once, its output is shaped like its input (its handler's ``identity_weight``) and it is
    not in ``ignore`` (names or prefixes); its norm is the one leaf module that alone reads
    the layer's output, called once and affine in eval mode (a batch norm)."""
    ops = graph.ops("eval")
    calls = graph.state.calls["eval"]
    parents = {c.parent for c in calls}
    leaves = [c for c in calls if c.index not in parents]
    times = Counter(c.name for c in leaves)
    readers: dict[int, list[int]] = defaultdict(list)
    for op in ops:
        for v in op.in_values:
            if v >= 0:
                readers[v].append(op.index)
    modules = dict(model.named_modules())
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for c in leaves:
        if c.name in seen:
            continue
        seen.add(c.name)
        mod = modules[c.name]
        handler = handler_for(mod)
        if handler is None or not handler.has_filters:
            continue
        if under(c.name, ignore):
            skipped[c.name] = "ignored"
        elif handler.identity_weight(mod) is None:
            skipped[c.name] = ("takes no identity shortcut (its output is shaped unlike its input, or no kernel "
                               "tap sits on the output position)")
        elif times[c.name] > 1:
            skipped[c.name] = f"called {times[c.name]} times"
        elif len(c.in_values) != 1 or len(c.out_values) != 1:
            skipped[c.name] = "not one tensor in and one out"
        else:
            sites.append(Site(c.name, _norm_after(c, leaves, times, readers, modules, ignore)))
    return sites, skipped


def _norm_after(conv_call: Any, leaves: list[Any], times: Counter, readers: dict[int, list[int]],
                modules: dict[str, nn.Module], ignore: tuple[str, ...]) -> str | None:
    """The norm that alone reads ``conv_call``'s output (all the ops reading it run inside
    that norm's call), when it is called once and affine in eval mode; else None."""
    v = conv_call.out_values[0]
    takers = [d for d in leaves if d.in_values[:1] == [v]]
    if len(takers) != 1:
        return None
    d = takers[0]
    norm = modules[d.name]
    handler = handler_for(norm)
    if handler is None or handler.eval_affine(norm) is None or times[d.name] != 1 or under(d.name, ignore):
        return None
    if not all(d.first_op <= i <= d.last_op for i in readers.get(v, [])):
        return None
    return d.name


def wrap_plan(model: nn.Module, sites: list[Site], init_scale: float = 1.0) -> PruningPlan:
    """The plan that turns every site into a :class:`ResidualConv` (its norm moved in, the
    norm's place an identity) with factor ``init_scale``; applied with
    :func:`prunekit.apply_plan`, it gives the network that trains."""
    steps: list[Step] = []
    for s in sites:
        conv = model.get_submodule(s.conv)
        norm = model.get_submodule(s.norm) if s.norm else None
        steps.append(replace_step(s.conv, ResidualConv(copy.deepcopy(conv), copy.deepcopy(norm), init_scale)))
        if s.norm:
            steps.append(Drop(s.norm, "identity"))
    return PruningPlan(tuple(steps))


def fuse(block: ResidualConv) -> nn.Module:
    """One ordinary conv computing ``block`` in eval mode: its norm folded into the conv
    (running statistics), scaled by the factor, the identity added at the kernel centre.
    The fused conv always has a bias. Raises :class:`PruningError` when the conv takes no
    identity or the norm is not affine in eval mode."""
    conv, norm = block.conv, block.norm
    handler = handler_for(conv)
    eye = handler.identity_weight(conv) if handler is not None else None
    if eye is None:
        raise PruningError(f"resconv: {type(conv).__name__} {conv} cannot take an identity shortcut")
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(w.shape[handler.weight_dims(conv)[0]])
    shape = [1] * w.ndim
    shape[handler.weight_dims(conv)[0]] = -1
    if norm is not None:
        nh = handler_for(norm)
        affine = nh.eval_affine(norm) if nh is not None else None
        if affine is None:
            raise PruningError(f"resconv: {type(norm).__name__} is not affine in eval mode; it cannot be folded")
        a, c = (t.detach().double() for t in affine)
        w, b = w * a.view(shape), b * a + c
    s = block.scale.detach().double()
    factory, args = describe(conv)
    fused = build(factory, {**args, "bias": True}).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(s * w + eye.double())
        fused.bias.copy_(s * b)
    return fused.train(block.training)


def convert(model: nn.Module, example_inputs: Any, *, ignore: tuple[str, ...] = (),
            init_scale: float = 1.0) -> tuple[nn.Module, list[Site], dict[str, str]]:
    """Step 1: a copy of ``model`` with every site a :class:`ResidualConv` of factor
    ``init_scale``; returns it, the sites and the skipped layers with reasons. Checks that
    with the shortcuts off the copy computes ``model``. Raises :class:`PruningError` when
    no layer qualifies."""
    graph = pk.trace(model, example_inputs)
    sites, skipped = find_sites(model, graph, ignore)
    if not sites:
        raise PruningError("resconv: no conv takes an identity shortcut (none has equal input and output shapes, "
                           "stride 1 and a centred odd kernel, outside ignore)")
    wrapped = apply_plan(model, wrap_plan(model, sites, init_scale))
    _check_wrapping(model, wrapped, sites, example_inputs)
    return wrapped, sites, skipped


def factors(wrapped: nn.Module, sites: list[Site]) -> dict[str, float]:
    """The layer factor ``s`` of every site of a converted network."""
    return {s.conv: float(wrapped.get_submodule(s.conv).scale.detach()) for s in sites}


def removal_order(wrapped: nn.Module, sites: list[Site]) -> list[str]:
    """Sites' convs by ``|s|``, smallest first (execution order among equals)."""
    f = factors(wrapped, sites)
    return sorted((s.conv for s in sites), key=lambda n: abs(f[n]))


def _steps(sites: list[Site], removed: set[str], fused: dict[str, nn.Module], with_norms: bool) -> list[Step]:
    """Steps 3-4: a removed site's conv dropped, a kept one replaced by its fused conv;
    ``with_norms`` adds the norms' drops (the plan relative to the original model, where the
    norms still stand; in the converted network they are identities already)."""
    steps: list[Step] = []
    for s in sites:
        if with_norms and s.norm:
            steps.append(Drop(s.norm, "identity"))
        steps.append(Drop(s.conv, "identity") if s.conv in removed else replace_step(s.conv, fused[s.conv]))
    return steps


def finalize(wrapped: nn.Module, sites: list[Site], removed: Iterable[str],
             example_inputs: Any | None = None) -> tuple[nn.Module, PruningPlan]:
    """Steps 3-4 on a (trained) converted network: the ``removed`` sites' layers become
    identities, every other site is fused into one conv. Returns the model (eval mode) and
    its plan relative to the *original* architecture. With ``example_inputs`` the result is
    checked against ``wrapped`` with the removed factors at 0 (:class:`PruningError` if it
    differs)."""
    gone = set(removed)
    unknown = gone - {s.conv for s in sites}
    if unknown:
        raise PruningError(f"resconv: {sorted(unknown)} are not ResConv sites")
    wrapped.eval()
    fused = {s.conv: fuse(wrapped.get_submodule(s.conv)) for s in sites if s.conv not in gone}
    small = apply_plan(wrapped, PruningPlan(tuple(_steps(sites, gone, fused, with_norms=False)))).eval()
    if example_inputs is not None:
        _check_fusion(wrapped, small, gone, example_inputs)
    plan = PruningPlan(tuple(_steps(sites, gone, fused, with_norms=True)),
                       {"method": "resconv", "removed_layers": [s.conv for s in sites if s.conv in gone],
                        "layers": len(sites)})
    return small, plan


def choose_removed(model: nn.Module, example_inputs: Any, wrapped: nn.Module, sites: list[Site], cfg: PruneConfig,
                   threshold: float, by_ratio: bool) -> tuple[list[str], str, dict[str, Any] | None]:
    """The layers to remove: under ``cfg``'s FLOPs/params target the fewest in
    :func:`removal_order` whose removal keeps at most the target (bisection over the measured
    fused network; all of them, with a warning, when even that keeps more); with
    ``by_ratio`` that fraction of the sites; else those with ``|s| < threshold``. Returns the
    layers, the rule used and the budget report (None without a target)."""
    order = removal_order(wrapped, sites)
    if cfg.target is None:
        if by_ratio:
            return order[:int(round(cfg.ratio * len(sites)))], "ratio", None
        f = factors(wrapped, sites)
        return [n for n in order if abs(f[n]) < threshold], "threshold", None
    budget = make_budget(model, example_inputs, cfg)
    assert budget is not None

    measured: dict[int, float] = {}

    def kept(k: int) -> float:
        if k not in measured:
            measured[k] = budget.measure(finalize(wrapped, sites, order[:k])[0]) / budget.base
        return measured[k]

    k = smallest_prefix(lambda j: kept(j) <= budget.target, len(sites))
    if k is None:
        k = len(sites)
        log.warning("resconv: removing all %d eligible layers keeps more than the %s target %.3f",
                    k, budget.kind, budget.target)
    return order[:k], f"target_{budget.kind}", budget_report(budget.kind, budget.target, kept(k))


class FactorL1(Callback):
    """Training-loop callback: adds ``l1 * sum |s|`` over the layer factors of the named
    :class:`ResidualConv` blocks and records every factor in each epoch's record
    (``resconv_factors``). The factors are model parameters, so checkpoints hold them."""

    def __init__(self, names: list[str], l1: float) -> None:
        self.names, self.l1 = list(names), float(l1)
        self.factors: list[Tensor] = []

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Find the factors in the (possibly device-moved) model."""
        self.factors = [model.get_submodule(n).scale for n in self.names]

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """``l1 * sum |s|`` (None when ``l1`` is 0 or there is no factor)."""
        if not self.l1 or not self.factors:
            return None
        return self.l1 * torch.stack([f.abs() for f in self.factors]).sum()

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        """Record the factors after this epoch."""
        record["resconv_factors"] = {n: float(f.detach()) for n, f in zip(self.names, self.factors)}


def default_train_config(epochs: int) -> TrainConfig:
    """The training-method convention's fine-tune: SGD momentum 0.9, lr 0.01 cosine, weight
    decay 5e-4, for ``epochs``."""
    return TrainConfig(epochs=epochs, lr=0.01, optimizer="sgd", momentum=0.9, weight_decay=5e-4, schedule="cosine",
                       tensorboard=False)


@register("resconv")
def resconv(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
            val_loader: Iterable[Any] | None = None, epochs: int | None = None, train_config: TrainConfig | None = None,
            run_dir: str | None = None, resume: bool = False, l1: float = 1e-3, threshold: float = 1e-2,
            init_scale: float = 1.0, batches: int | None = None, progress: bool = False, **kwargs: Any) -> MethodResult:
    """Convert the eligible convs to ResConv blocks, train with L1 on their factors, remove
    the layers whose factor is small and fuse the rest back into plain convs.

    ``loader`` (training batches) is trained on for ``epochs`` epochs (default: those of
    ``train_config``, or 10) with ``train_config`` (default :func:`default_train_config`);
    ``run_dir`` / ``resume`` make the training resumable. Layers go by ``threshold`` on
    ``|s|``, or, with ``target_flops`` / ``target_params`` in ``kwargs``, the fewest in order
    of ``|s|`` whose removal keeps at most the target; an explicit ``ratio=`` removes that
    fraction of the eligible layers. ``ignore`` keeps layers plain. ``batches`` is accepted
    for the common call and not used. The user's model is not changed. Returns the fused
    model (eval mode), its plan relative to the original architecture and ``info``: the
    sites, the skipped layers and why, the factors, their per-epoch trajectory, the removed
    and fused layers, the selection rule and budget reached, FLOPs/params kept, training
    metrics. Raises :class:`PruningError` for bad options, no eligible layer, a latency
    target, or training without ``loader``."""
    del batches
    try:
        opts = ResConvOptions(l1=l1, threshold=threshold, init_scale=init_scale)
    except ValueError as exc:
        raise PruningError(str(exc)) from None
    by_ratio = kwargs.get("ratio") is not None
    cfg = budget_config(kwargs, "resconv")
    check_target_kind(cfg.target, "resconv")
    if train_config is not None and not isinstance(train_config, TrainConfig):
        raise PruningError(f"resconv: train_config must be a TrainConfig, got {type(train_config).__name__}")
    tcfg = train_config if train_config is not None else default_train_config(10 if epochs is None else epochs)
    if epochs is not None:
        tcfg = dataclasses.replace(tcfg, epochs=int(epochs))
    if tcfg.epochs > 0 and loader is None:
        raise PruningError("method 'resconv' trains the network: pass loader= (batches of (inputs, targets)) "
                           "and epochs=")
    ignore = module_names(model, list(cfg.ignore), "ignore") if cfg.ignore else ()

    wrapped, sites, skipped = convert(model, example_inputs, ignore=ignore, init_scale=opts.init_scale)  # 1
    result = train(wrapped, loader if loader is not None else [], tcfg, val_loader=val_loader,  # 2
                   run_dir=run_dir, resume=resume, progress=progress,
                   callbacks=[FactorL1([s.conv for s in sites], opts.l1)])
    wrapped.eval()
    removed, rule, reached = choose_removed(model, example_inputs, wrapped, sites, cfg, opts.threshold, by_ratio)  # 3
    small, plan = finalize(wrapped, sites, removed, example_inputs)  # 3-4

    learned = factors(wrapped, sites)
    kept_abs = sorted(abs(v) for n, v in learned.items() if n not in set(removed))
    info: dict[str, Any] = {
        "sites": [dataclasses.asdict(s) for s in sites], "skipped": skipped, "factors": learned,
        "removed": removed, "fused": [s.conv for s in sites if s.conv not in set(removed)], "selection": rule,
        # The threshold the removal amounts to: the smallest |s| kept (every removed one is
        # at or below it); None when every layer went.
        "effective_threshold": kept_abs[0] if kept_abs else None,
        "options": dataclasses.asdict(opts),
        "flops_kept": count_flops(small, example_inputs) / max(1, count_flops(model, example_inputs)),
        "params_kept": count_params(small) / max(1, count_params(model)),
        "factor_trajectory": [h.get("resconv_factors") for h in result.history],
        "train": result.final, "epochs": tcfg.epochs,
    }
    if reached is not None:
        info["budget"] = reached
    return MethodResult(small, plan, info)


resconv.trains = True  # type: ignore[attr-defined]


def _close(a: list[Tensor], b: list[Tensor], rtol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and bool(((x - y).abs().max() <= rtol * (1 + y.abs().max())).item()) for x, y in zip(a, b))


def _check_wrapping(model: nn.Module, wrapped: nn.Module, sites: list[Site], example_inputs: Any) -> None:
    """With the shortcuts off, the wrapped network must compute the original: what shows a
    norm moved into a branch that something else also read. Raises :class:`PruningError`."""
    blocks = [wrapped.get_submodule(s.conv) for s in sites]
    for b in blocks:
        b.shortcut = False
    try:
        same = _close(output_tensors(wrapped, example_inputs), output_tensors(model, example_inputs))
    finally:
        for b in blocks:
            b.shortcut = True
    if not same:
        raise PruningError("resconv: moving the batch norms into the residual branches changed the network "
                           f"(sites {[dataclasses.asdict(s) for s in sites]}); pass the offending layers in ignore=")


def _check_fusion(wrapped: nn.Module, small: nn.Module, removed: set[str], example_inputs: Any) -> None:
    """The fused model must compute the trained ResConv network with the removed factors at
    0 (eval mode); raises :class:`PruningError` otherwise (all-or-nothing)."""
    ref = copy.deepcopy(wrapped)
    with torch.no_grad():
        for name in removed:
            ref.get_submodule(name).scale.zero_()
    if not _close(output_tensors(small, example_inputs), output_tensors(ref, example_inputs)):
        raise PruningError("resconv: the fused network does not compute the trained one (a layer kind whose "
                           "fusion is not exact)")
