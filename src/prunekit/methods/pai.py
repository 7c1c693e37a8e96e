"""Pruning at initialisation (the training- and label-free perspective of FreeNAS-style proxies).

What the literature does, and how this module does it:

  1. **Score an untrained network.** SNIP (``|w dL/dw|`` on one batch), GraSP (``-w Hg``) and
     SynFlow (data-free: ``|w dR/dw|`` of the absolute-valued network on an all-ones input)
     rank connections at initialisation; FreeNAS-style proxies use such training-free scores to
     pick sub-architectures in seconds. Here the criteria ``snip``, ``grasp`` and ``synflow``
     of :mod:`prunekit.criteria.init` score *channels* (the sum over the weights a channel
     owns), and the scores are ranked across all groups (``global_ranking="raw"``), so the
     proxy decides the per-layer widths under the budget as the papers' global threshold does.
  2. **Prune** to the budget (``target_flops`` etc., exactly, by the ordinary allocator).
  3. **Train from scratch** the pruned network for ``epochs`` on ``loader`` (the training-method
     convention: ``train_config``, ``run_dir``/``resume``; default SGD momentum 0.9, lr 0.1
     cosine, weight decay 5e-4, a from-scratch schedule), unless ``epochs=0``.

Departures: the papers prune individual connections (unstructured masks); here whole channels
go, so the result is a smaller dense network. SynFlow is scored in one round, not the paper's
100 prune-and-rescore rounds. The score is taken on the network as given: pass it untrained
(prunekit does not re-initialise it). ``info["score_seconds"]`` reports how long scoring took,
the quantity these proxies are about.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from torch import nn

import prunekit as pk
from prunekit.errors import PruningError
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.methods._training import training_config
from prunekit.recover.config import TrainConfig
from prunekit.recover.train import train

PROXIES = ("snip", "grasp", "synflow")


@register("pai")
def pai(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
        val_loader: Iterable[Any] | None = None, epochs: int | None = None, train_config: TrainConfig | None = None,
        run_dir: Any = None, resume: bool = False, proxy: str = "synflow", batches: int = 1, progress: bool = False,
        **kwargs: Any) -> MethodResult:
    """Score ``model`` (untrained) with ``proxy`` ('snip', 'grasp' or 'synflow') on ``batches``
    batches of ``loader`` (SynFlow reads only their shape), prune it to the budget in
    ``kwargs`` with the scores ranked globally, then train the pruned network from scratch
    for ``epochs`` (0 or None: no training). Returns the pruned (trained) model, its plan
    and ``info`` (proxy, scoring seconds, training history)."""
    if proxy not in PROXIES:
        raise PruningError(f"method 'pai': proxy={proxy!r}; choose from {', '.join(PROXIES)}")
    cfg = budget_config(kwargs, "pai")
    calib = take_batches(loader, batches, "pai")
    if cfg.global_ranking is False:
        cfg = cfg.replace(global_ranking="raw")  # the proxy sets the widths, as the papers' global threshold
    t0 = time.perf_counter()
    small, plan = pk.prune(model, example_inputs, config=cfg, criterion=proxy,  # a copy; the scores use autograd.grad
                           criterion_kwargs={"loader": calib, "batches": len(calib)}, return_plan=True)
    seconds = time.perf_counter() - t0
    info: dict[str, Any] = {"proxy": proxy, "score_seconds": seconds, "global_ranking": cfg.global_ranking}
    if epochs:
        assert loader is not None  # take_batches checked it
        scratch = train_config or TrainConfig(epochs=int(epochs), lr=0.1, momentum=0.9, weight_decay=5e-4,
                                              schedule="cosine", tensorboard=False)
        result = train(small, loader, training_config(scratch, epochs, None), val_loader=val_loader,
                       run_dir=run_dir, resume=resume, progress=progress)
        info["train"] = {"epochs": result.epochs_completed, "history": result.history}
    return MethodResult(small.eval(), plan, info)


pai.trains = True  # type: ignore[attr-defined]


def architecture_scores(model: nn.Module, batches: list[tuple[Any, Any]]) -> dict[str, float]:
    """Training-free scores of a whole (untrained) architecture, as zero-cost NAS proxies
    use them: the sums over all weights of the SNIP (``|w dL/dw|``) and GraSP (``-w Hg``, the
    zero-cost-proxy convention; GraSP itself removes the weights with the largest values)
    saliencies on ``batches``, of SynFlow's (``|w dR/dw|``, as log10; it reads only the
    batches' shape), and the log path norm (data- and label-free,
    :func:`prunekit.criteria.init.path_norm`); ``"<name>_seconds"`` is the time each took.
    How well each ranks trained accuracy, and in which direction, is what
    ``benchmarks/pai_proxies.py`` measures."""
    import math

    from prunekit.criteria.init import grasp_saliency, path_norm, snip_saliency, synflow_saliency

    shape = tuple(batches[0][0].shape)

    def total(saliency: dict[str, Any]) -> float:
        return sum(float(v.sum()) for v in saliency.values())

    out: dict[str, float] = {}
    for name, fn in (("snip", lambda: total(snip_saliency(model, batches))),
                     ("grasp", lambda: -total(grasp_saliency(model, batches))),
                     ("synflow", lambda: math.log10(max(total(synflow_saliency(model, shape)), 1e-300))),
                     ("pathnorm", lambda: path_norm(model, shape))):
        t0 = time.perf_counter()
        out[name] = fn()
        out[f"{name}_seconds"] = time.perf_counter() - t0
    return out
