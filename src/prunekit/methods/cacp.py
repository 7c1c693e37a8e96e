"""CACP: conditional automated channel pruning (Liu et al. 2020), on the agent of AMC (He et al. 2018).

What the papers do, and how this module does it:

  1. **An MDP over the layers** (AMC). An agent walks the prunable layers in order; at layer
     ``t`` it sees an embedding of the layer (index, channel counts, the layer's FLOPs, FLOPs
     removed so far, FLOPs of the layers still to come, the previous action) and outputs the
     layer's *keep ratio*. Here the "layers" are prunable coupled groups of
     :func:`prunekit.trace`, walked in ``graph.groups`` order; the embedding is
     :data:`STATE_FEATURES` (the static columns min-max normalised over the walked groups, as
     AMC normalises its table).
  2. **Conditioning** (CACP). The embedding is augmented with the target compression rate ``c``
     (fraction of FLOPs kept), and one agent is trained while ``c`` is drawn from a set every
     episode (default {0.3, 0.5, 0.7}); the trained agent then gives per-layer ratios for any
     ``c`` without a new search: :meth:`CACPPolicy.query`. ``conditional=False`` trains the
     same agent for the one target (the per-rate search CACP compares against).
  3. **Constraint-guaranteed actions** (AMC's trick, used by CACP). Each action is clipped so
     that the layers still to come can meet ``c``: :func:`feasible_range` bounds the group's
     kept count by the FLOPs the rest reaches at its smallest and at its full width (cost model
     :class:`prunekit.allocate.cost.CostModel`, exact for the kept channels). Here the clip is
     two-sided, to a band ``[c - w, c]`` of FLOPs kept: ``w`` is :func:`landing_width`, the
     widest gap one group's channel step can leave between what the rest reaches, so a
     feasible completion exists after every clipped action and the episode ends inside the
     band (a proof is in :func:`landing_width`'s docstring; ``tests/methods/test_cacp.py``
     checks it against brute force). AMC only bounds from above and relies on its reward to
     use the budget.
  4. **Reward**: accuracy on a validation split after a cheap recovery, the channels inside each
     layer ranked by their norm (CACP: L1, AMC: L2 / their own). Here the channels are ranked by
     prunekit's ``l2`` criterion and removed by :func:`prunekit.prune` with per-group ratios
     (``group_ratios``); the recovery is BN re-calibration on a few training batches
     (``recovery="bn"``, :func:`prunekit.recover.recalibrate_bn`), least-squares compensation
     (``"reconstruct"``, :func:`prunekit.recover.reconstruct`) or none; the reward is top-1 on
     ``val_batches`` batches of ``val_loader`` (``reward="accuracy"``, CACP's ``acc``;
     ``"error_log_flops"`` is AMC's ``-error * log(FLOPs)``).
  5. **Agent**: DDPG as in AMC: actor and critic MLPs (two hidden layers of ``hidden`` = 300),
     Adam (actor 1e-4, critic 1e-3), a replay buffer, ``warmup`` episodes of uniform random
     actions, then the actor's action plus truncated-normal noise of width ``sigma`` (0.5,
     times 0.95 per episode); every transition of an episode gets the episode's reward less a
     moving-average baseline (``baseline_alpha`` 0.5), one minibatch update (``batch_size``
     64) per transition.
  6. **Output**: the model for ``target_flops`` (``res.model``, ``res.plan``) and the trained
     :class:`CACPPolicy` (``res.info["policy"]``), which saves and loads without pickle
     (``policy.safetensors`` + ``policy.json``). ``epochs`` fine-tunes the returned model on
     ``loader`` (the CACP repository fine-tunes every exported model, for 400 epochs).

Departures (labelled; none changes what the algorithm is):

* **Critic target**: the episode's (baselined) reward itself, a Monte Carlo target, with no
  bootstrapping and so no target networks; AMC's code bootstraps with discount 1 through
  soft-updated target networks. Every step's return in this MDP *is* the terminal reward.
* **Action mapping**: the actor's sigmoid output ``a`` maps linearly to a keep ratio in
  ``[min_keep, 1]`` (AMC clips the ratio into its bounds); the replay buffer holds the action
  after the constraint clip, the one that produced the reward.
* **Two-sided band and a FLOPs grid**: the clip keeps the result in ``[c_q - w, c_q]`` where
  ``c_q`` is ``c`` rounded down to a multiple of ``w``. Bands of different grid points do not
  overlap, which makes the FLOPs of :meth:`CACPPolicy.query` non-decreasing in ``c`` by
  construction; the price is that a query lands in ``(c - 2w, c]``. For ResNet-20 ``w`` is
  about 0.2% of the FLOPs.
* **Budget pressure** (``pressure=True``, default; not in either paper): the embedding also
  carries ``(upper - c) / (upper - lower)``, where ``upper`` / ``lower`` are the cost with the
  groups from this one on at their largest / smallest widths: how much of what can still be cut
  must be cut. AMC's columns and ``c`` determine it, but an agent with a few hundred episodes
  does not learn that map; ``pressure=False`` is the papers' embedding.
* **Groups, not layers**: coupled layers (a residual stage) take one action; groups kept whole
  by validation repairs or with one possible width are not walked.
* **Search state**: not checkpointed per episode; with ``run_dir`` a finished search is saved
  there (``run_dir/cacp_policy``) and ``resume=True`` loads it instead of searching again.
* Budgets: ``target_flops`` (the paper's ``c``) or ``target_params``; no latency.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import prunekit as pk
from prunekit.allocate import select
from prunekit.allocate.cost import CostModel
from prunekit.criteria import score_groups
from prunekit.errors import PruningError
from prunekit.features import as_batch
from prunekit.graph import module_names
from prunekit.measure import count_flops, count_params
from prunekit.methods import MethodResult, budget_config, register
from prunekit.methods._training import split_options, training_config
from prunekit.recover import evaluate, recalibrate_bn
from prunekit.recover.config import TrainConfig
from prunekit.recover.reconstruct import reconstruct
from prunekit.recover.train import train
from prunekit.runtime import atomic_directory, infer_device, readable_directory, to_device

__all__ = ["CACPOptions", "CACPPolicy", "feasible_range", "clip_count", "landing_width", "STATE_FEATURES",
           "POLICY_WEIGHTS", "POLICY_JSON"]
log = logging.getLogger(__name__)

RECOVERY = ("bn", "reconstruct", "none")
REWARDS = ("accuracy", "error_log_flops")
#: The embedding of a walked group: AMC's columns (static ones normalised over the walked
#: groups), the target ``c`` (0 when not conditioned) and the budget pressure (0 with
#: ``pressure=False``): the share of what the groups from this one on can still shed that must
#: go to reach ``c``.
STATE_FEATURES = ("position", "channels", "prunable_channels", "producing_layers", "group_cost", "cost_after",
                  "cost_removed_so_far", "previous_keep", "target", "budget_pressure")
POLICY_WEIGHTS = "policy.safetensors"
POLICY_JSON = "policy.json"
_FORMAT = "prunekit-cacp-policy"
_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# The constraint-guaranteed clip: pure functions of kept counts and a cost function.
# ---------------------------------------------------------------------------------------------

def feasible_range(t: int, prefix: Sequence[int], allowed: Sequence[Sequence[int]],
                   cost: Callable[[np.ndarray], float], lo: float, hi: float) -> tuple[int, int] | None:
    """Indices ``(j0, j1)`` into ``allowed[t]`` (the kept counts group ``t`` may take,
    ascending) of the counts that keep the band ``[lo, hi]`` reachable: with groups ``< t`` at
    ``prefix`` and group ``t`` at ``allowed[t][j]``, the rest at its smallest counts costs at
    most ``hi`` and at its largest at least ``lo``. None when no count does.

    ``cost`` maps a vector of kept counts (one per group) to the budgeted quantity and must be
    non-decreasing in every count; both bounds then grow with ``j``, so the feasible counts
    are one run, found by two bisections (about ``2 log2 |allowed[t]|`` cost evaluations)."""
    ks = list(allowed[t])
    head = [int(k) for k in prefix]
    if len(head) != t:
        raise ValueError(f"feasible_range: prefix has {len(head)} counts for group {t}")
    rest_min = [int(a[0]) for a in allowed[t + 1:]]
    rest_max = [int(a[-1]) for a in allowed[t + 1:]]

    def low(j: int) -> float:
        return cost(np.array(head + [int(ks[j])] + rest_min, dtype=np.int64))

    def high(j: int) -> float:
        return cost(np.array(head + [int(ks[j])] + rest_max, dtype=np.int64))

    # j1: the largest j with low(j) <= hi; j0: the smallest j with high(j) >= lo.
    if low(0) > hi + _EPS or high(len(ks) - 1) < lo - _EPS:
        return None
    a, b = 0, len(ks) - 1
    while a < b:
        m = (a + b + 1) // 2
        if low(m) <= hi + _EPS:
            a = m
        else:
            b = m - 1
    j1 = a
    a, b = 0, len(ks) - 1
    while a < b:
        m = (a + b) // 2
        if high(m) >= lo - _EPS:
            b = m
        else:
            a = m + 1
    j0 = a
    return (j0, j1) if j0 <= j1 else None


def clip_count(proposal: float, t: int, prefix: Sequence[int], allowed: Sequence[Sequence[int]],
               cost: Callable[[np.ndarray], float], lo: float, hi: float) -> int:
    """The kept count of group ``t`` nearest ``proposal`` (a count, fractional allowed) among
    those of :func:`feasible_range` (ties: the smaller). Raises ValueError when none is
    feasible, which cannot happen along a walk that started feasible with a band at least
    :func:`landing_width` wide."""
    rng = feasible_range(t, prefix, allowed, cost, lo, hi)
    if rng is None:
        raise ValueError(f"clip_count: no kept count of group {t} keeps [{lo:.6g}, {hi:.6g}] reachable")
    ks = np.asarray(allowed[t][rng[0]:rng[1] + 1], dtype=np.float64)
    return int(ks[int(np.argmin(np.abs(ks - proposal)))])


def landing_width(allowed: Sequence[Sequence[int]], cost: Callable[[np.ndarray], float]) -> float:
    """The narrowest band width ``w`` for which the clip always leaves a feasible completion.

    At step ``t`` the kept counts ``k`` of group ``t`` give intervals ``I(k)`` = [cost with the
    rest at its smallest, cost with the rest at its largest]; both ends grow with ``k``, and
    the previous step chose a ``k`` whose hull of ``I`` meets the band. So some ``I(k)`` meets
    the band unless the band fits into a gap between consecutive intervals, and a band at least
    as wide as every such gap cannot. A gap is at most (group ``t``'s largest one-count cost
    step) minus (the smallest cost range of the rest): for a cost that is a polynomial with
    non-negative coefficients in the kept channels (FLOPs and parameters are: products of kept
    input and output fractions), steps are largest with every other group at its largest count,
    and the rest's range is smallest with the groups before it at their smallest. Returns
    ``max_t max(0, step_t - range_t)`` (the last group's range is 0), as the cost's unit."""
    top = [int(a[-1]) for a in allowed]
    bottom = [int(a[0]) for a in allowed]
    width = 0.0
    for t, ks in enumerate(allowed):
        step = 0.0
        for k0, k1 in zip(ks, list(ks)[1:]):
            v = list(top)
            v[t] = int(k1)
            up = cost(np.array(v, dtype=np.int64))
            v[t] = int(k0)
            step = max(step, up - cost(np.array(v, dtype=np.int64)))
        rest_max = bottom[:t + 1] + top[t + 1:]
        spread = cost(np.array(rest_max, dtype=np.int64)) - cost(np.array(bottom, dtype=np.int64))
        width = max(width, step - spread)
    return width


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CACPOptions:
    """CACP's knobs (module docstring): the targets ``c`` sampled during the search (fractions
    kept), whether the agent is conditioned on ``c``, the number of episodes and random warm-up
    episodes (default a quarter), the smallest keep ratio per group (AMC's 0.2), the agent's MLP
    width, learning rates, minibatch, exploration noise and its decay, the reward baseline's
    rate, the replay buffer's size, the recovery before the reward (``bn``, ``reconstruct`` or
    ``none``), the reward (``accuracy`` or ``error_log_flops``), the calibration and
    validation batches, a floor on the FLOPs grid step (``resolution``, as a fraction kept),
    whether the embedding carries the budget pressure (``pressure``, not in the papers; False
    leaves that feature at 0) and the seed."""

    targets: tuple[float, ...] = (0.3, 0.5, 0.7)
    conditional: bool = True
    episodes: int = 200
    warmup: int | None = None
    min_keep: float = 0.2
    hidden: int = 300
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    batch_size: int = 64
    sigma: float = 0.5
    sigma_decay: float = 0.95
    baseline_alpha: float = 0.5
    buffer: int = 20000
    recovery: str = "bn"
    reward: str = "accuracy"
    batches: int = 4
    val_batches: int = 4
    resolution: float = 0.0
    pressure: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        """Check the values (:class:`PruningError` naming the option)."""
        targets = tuple(float(c) for c in (self.targets if isinstance(self.targets, Iterable) else [self.targets]))
        if not targets or any(not 0.0 < c <= 1.0 for c in targets):
            raise PruningError(f"cacp: targets={self.targets!r}: need fractions kept in (0, 1]")
        object.__setattr__(self, "targets", tuple(sorted(set(targets))))
        for key in ("episodes", "hidden", "batch_size", "buffer", "batches", "val_batches"):
            if int(getattr(self, key)) < 1:
                raise PruningError(f"cacp: {key}={getattr(self, key)!r} must be >= 1")
        if self.warmup is not None and not 0 <= self.warmup:
            raise PruningError(f"cacp: warmup={self.warmup!r} must be >= 0")
        if not 0.0 < self.min_keep <= 1.0:
            raise PruningError(f"cacp: min_keep={self.min_keep!r} must be in (0, 1]")
        for key in ("actor_lr", "critic_lr", "sigma", "resolution"):
            if getattr(self, key) < 0:
                raise PruningError(f"cacp: {key}={getattr(self, key)!r} must be >= 0")
        if not 0.0 < self.sigma_decay <= 1.0 or not 0.0 < self.baseline_alpha <= 1.0:
            raise PruningError("cacp: sigma_decay and baseline_alpha must be in (0, 1]")
        if self.recovery not in RECOVERY:
            raise PruningError(f"cacp: recovery={self.recovery!r}; choose from {', '.join(RECOVERY)}")
        if self.reward not in REWARDS:
            raise PruningError(f"cacp: reward={self.reward!r}; choose from {', '.join(REWARDS)}")

    @property
    def warmup_episodes(self) -> int:
        """Episodes of random actions before the agent acts (default a quarter of them)."""
        return int(self.episodes // 4 if self.warmup is None else min(self.warmup, self.episodes))

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dict."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d


# ---------------------------------------------------------------------------------------------
# The search space: groups, their possible widths, which channels go, the cost of a choice.
# ---------------------------------------------------------------------------------------------

class _Space:
    """A traced working copy of the model with, per group, the kept counts it may take and,
    for each, the channels removed (the lowest ``l2`` scores, as :func:`prunekit.prune` removes
    them for the same ``group_ratios``); the walked groups are those with more than one count.
    ``cost(counts)`` is the budgeted quantity kept (a fraction) for kept counts of the walked
    groups."""

    def __init__(self, model: nn.Module, example_inputs: Any, *, kind: str, ignore: list[str] | None,
                 round_to: int, min_channels: int, min_keep: float) -> None:
        self.model = copy.deepcopy(model).eval()
        self.example_inputs = example_inputs
        self.kind, self.ignore = kind, list(ignore or [])
        self.round_to, self.min_channels, self.min_keep = int(round_to), int(min_channels), float(min_keep)
        self.graph = pk.trace(self.model, example_inputs, ignore=self.ignore or None)
        self.groups = list(self.graph.groups)
        self.costs = CostModel(self.graph, self.model, example_inputs)
        self.base = self.costs.base(kind)
        scores = score_groups(self.model, self.groups, "l2")
        self.requests: list[dict[int, int]] = []  # group -> kept count -> channels requested off
        self.removal: list[dict[int, np.ndarray]] = []  # group -> kept count -> local channels removed
        for g, s in zip(self.groups, scores):
            req: dict[int, int] = {}
            rem: dict[int, np.ndarray] = {}
            floor_k = max(1, int(math.ceil(self.min_keep * g.size - 1e-9)))
            for n in range(g.size if g.n_prunable else 1):
                r = select([g], [s], ratio=n / g.size, round_to=self.round_to, min_channels=self.min_channels)[0]
                k = g.size - len(r)
                if k >= floor_k and k not in req:
                    req[k], rem[k] = n, r
            self.requests.append(req)
            self.removal.append(rem)
        self.repaired = self._check_repairs()
        self.walked = [i for i, req in enumerate(self.requests) if len(req) > 1 and i not in self.repaired]
        self.allowed = [sorted(self.requests[i]) for i in self.walked]
        self._full = [g.size for g in self.groups]
        self.static = self._static_features()

    # -- cost ---------------------------------------------------------------------------------
    def mask(self, counts: Sequence[int]) -> Tensor:
        """The cost model's keep mask with the walked groups at ``counts`` kept channels."""
        removed = [np.zeros(0, dtype=np.int64)] * len(self.groups)
        for i, k in zip(self.walked, counts):
            removed[i] = self.removal[i][int(k)]
        return self.costs.mask_of(removed)

    def cost(self, counts: Sequence[int]) -> float:
        """Fraction of the budgeted quantity kept with the walked groups at ``counts``."""
        return float(self.costs.measure(self.kind, self.mask(counts))) / self.base

    def _masked_cost(self, zeroed: Iterable[int]) -> float:
        """Fraction kept with every channel of the groups ``zeroed`` removed (for the embedding)."""
        m = torch.ones(self.costs.n, dtype=torch.float64)
        for i in zeroed:
            m[int(self.costs.offsets[i]):int(self.costs.offsets[i + 1])] = 0.0
        return float(self.costs.measure(self.kind, m)) / self.base

    def group_ratios(self, counts: Sequence[int]) -> dict[int, float]:
        """``group_ratios`` for :func:`prunekit.prune` (fraction removed per group index) that
        remove exactly the channels :meth:`mask` assumes."""
        return {i: self.requests[i][int(k)] / self.groups[i].size for i, k in zip(self.walked, counts)
                if self.requests[i][int(k)] > 0}

    def prune(self, counts: Sequence[int]) -> tuple[nn.Module, Any]:
        """The pruned copy and its plan for kept ``counts`` of the walked groups."""
        return pk.prune(self.model, self.example_inputs, graph=self.graph, ratio=0.0, criterion="l2",
                        group_ratios=self.group_ratios(counts) or None, round_to=self.round_to,
                        min_channels=self.min_channels, return_plan=True)

    def _check_repairs(self) -> set[int]:
        """Groups that validation keeps whole at their smallest width (they are not walked)."""
        counts = {i: min(req) for i, req in enumerate(self.requests) if len(req) > 1}
        if not counts:
            return set()
        ratios = {i: self.requests[i][k] / self.groups[i].size for i, k in counts.items()}
        plan = pk.plan_for(self.model, self.example_inputs, graph=self.graph, ratio=0.0, criterion="l2",
                           group_ratios=ratios, round_to=self.round_to, min_channels=self.min_channels)
        if not plan.meta.get("repairs"):
            return set()
        got = self.costs.mask_of_plan(plan)
        return {i for i in counts
                if bool((got[int(self.costs.offsets[i]):int(self.costs.offsets[i + 1])] == 1).all())}

    # -- embedding ----------------------------------------------------------------------------
    def _static_features(self) -> np.ndarray:
        """AMC's static columns per walked group, min-max normalised over the walked groups."""
        rows = []
        n = len(self.walked)
        for pos, i in enumerate(self.walked):
            g = self.groups[i]
            producers = len(g.producers) or sum(m.role == "out" for m in g.members)
            rows.append([pos, g.size, g.n_prunable, producers, 1.0 - self._masked_cost([i]),
                         1.0 - self._masked_cost(self.walked[pos + 1:]) if pos + 1 < n else 0.0])
        table = np.asarray(rows, dtype=np.float64).reshape(n, 6)
        lo, hi = table.min(axis=0), table.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        return (table - lo) / span

    def signature(self) -> list[dict[str, Any]]:
        """What a saved policy must find again in the model it is loaded for."""
        return [{"name": self.groups[i].name, "size": self.groups[i].size, "allowed": [int(k) for k in ks]}
                for i, ks in zip(self.walked, self.allowed)]


# ---------------------------------------------------------------------------------------------
# The agent (DDPG as in AMC, Monte Carlo critic target)
# ---------------------------------------------------------------------------------------------

def _mlp(n_in: int, hidden: int, out: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, 1)]
    if out is not None:
        layers.append(out)
    return nn.Sequential(*layers)


class _Agent:
    """Actor ``s -> a in [0, 1]`` and critic ``(s, a) -> Q``, their Adam optimisers, a replay
    buffer of (state, executed action, episode reward) and the reward's moving baseline."""

    def __init__(self, dim: int, opts: CACPOptions) -> None:
        self.opts = opts
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays where it was
            torch.manual_seed(opts.seed)
            self.actor = _mlp(dim, opts.hidden, nn.Sigmoid())
            self.critic = _mlp(dim + 1, opts.hidden, None)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=opts.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=opts.critic_lr)
        self.states = np.zeros((opts.buffer, dim), dtype=np.float32)
        self.actions = np.zeros(opts.buffer, dtype=np.float32)
        self.rewards = np.zeros(opts.buffer, dtype=np.float64)
        self.size = self.pos = 0
        self.baseline: float | None = None

    @torch.no_grad()
    def act(self, state: np.ndarray) -> float:
        """The actor's action at ``state`` (deterministic)."""
        return float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])

    def observe(self, states: list[np.ndarray], actions: list[float], reward: float) -> None:
        """Store an episode's transitions, each with the episode's reward; update the baseline."""
        for s, a in zip(states, actions):
            self.states[self.pos], self.actions[self.pos], self.rewards[self.pos] = s, a, reward
            self.pos = (self.pos + 1) % self.opts.buffer
            self.size = min(self.size + 1, self.opts.buffer)
        a = self.opts.baseline_alpha
        self.baseline = reward if self.baseline is None else self.baseline + a * (reward - self.baseline)

    def update(self, rng: np.random.Generator) -> tuple[float, float]:
        """One minibatch step of critic (MSE to the baselined reward) and actor (``-Q(s, mu(s))``);
        returns both losses."""
        idx = rng.integers(0, self.size, size=min(self.opts.batch_size, self.size))
        s = torch.from_numpy(self.states[idx])
        a = torch.from_numpy(self.actions[idx])[:, None]
        target = torch.from_numpy(self.rewards[idx] - (self.baseline or 0.0)).float()[:, None]
        q = self.critic(torch.cat([s, a], 1))
        critic_loss = torch.mean((q - target) ** 2)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        return float(critic_loss.detach()), float(actor_loss.detach())

    def tensors(self) -> dict[str, Tensor]:
        """Actor and critic weights, for safetensors."""
        out = {f"actor.{k}": v.detach().clone().contiguous() for k, v in self.actor.state_dict().items()}
        out.update({f"critic.{k}": v.detach().clone().contiguous() for k, v in self.critic.state_dict().items()})
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Load weights written by :meth:`tensors` (strict)."""
        self.actor.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("actor.")})
        self.critic.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("critic.")})


def _truncated_normal(rng: np.random.Generator, mean: float, sigma: float) -> float:
    """A draw of N(mean, sigma) truncated to [0, 1] (rejection; AMC's exploration noise)."""
    if sigma <= 0:
        return min(max(mean, 0.0), 1.0)
    for _ in range(64):
        v = rng.normal(mean, sigma)
        if 0.0 <= v <= 1.0:
            return float(v)
    return float(rng.uniform(0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------

class CACPPolicy:
    """A trained CACP agent over one model's groups: :meth:`query` gives per-group keep
    ratios and the pruned model for any target, :meth:`save` / :meth:`load` keep it without
    pickle. ``calib`` (calibration batches) and ``val`` (validation batches) are the recovery
    and reward data; a loaded policy has them only when they are passed to :meth:`load`."""

    def __init__(self, space: _Space, agent: _Agent, opts: CACPOptions, *, width: float,
                 calib: list[Any] | None, val: list[Any] | None, history: list[dict[str, Any]] | None = None) -> None:
        self.space, self.agent, self.opts = space, agent, opts
        self.width = float(width)
        self.calib, self.val = calib, val
        self.reward_data = "val_loader" if val is not None else "none"
        self.history = list(history or [])
        self.smallest = space.cost([a[0] for a in space.allowed]) if space.allowed else 1.0

    # -- the walk -----------------------------------------------------------------------------
    def grid(self, c: float) -> float:
        """``c`` rounded down to the policy's grid (multiples of the band width)."""
        return math.floor(float(c) / self.width + 1e-9) * self.width

    def band(self, c: float) -> tuple[float, float]:
        """The band ``[lo, hi]`` of the budgeted fraction kept that a query for ``c`` lands in."""
        hi = self.grid(c)
        return hi - self.width, hi

    def check_target(self, c: float) -> None:
        """Raise :class:`PruningError` when no choice of widths keeps at most ``c`` (its grid value)."""
        if self.smallest > self.grid(c) + _EPS:
            raise PruningError(f"cacp: target_{self.space.kind}={c:g} cannot be met; the smallest model this search "
                               f"allows keeps {100 * self.smallest:.2f}% of the {self.space.kind} "
                               f"(min_keep={self.opts.min_keep:g})")

    def walk(self, c: float, propose: Callable[[np.ndarray], float] | None = None
             ) -> tuple[list[int], list[np.ndarray], list[float]]:
        """One episode for target ``c``: at each walked group the embedding, a proposal in
        [0, 1] (``propose``; default the actor), mapped to a keep ratio in ``[min_keep, 1]``
        and clipped by :func:`clip_count`. Returns the kept counts, the states and the
        executed actions (the clipped ratios mapped back to [0, 1])."""
        sp = self.space
        if not sp.walked:
            return [], [], []
        self.check_target(c)
        lo, hi = self.band(c)
        propose = propose or self.agent.act
        feature_c = float(c) if self.opts.conditional else 0.0
        counts: list[int] = []
        states: list[np.ndarray] = []
        actions: list[float] = []
        prev = 1.0
        full = [a[-1] for a in sp.allowed]
        low = [a[0] for a in sp.allowed]
        span = 1.0 - self.opts.min_keep
        for t, ks in enumerate(sp.allowed):
            upper = sp.cost(counts + full[t:])
            pressure = 0.0
            if self.opts.pressure:  # the share of what the rest can still shed that must go
                lower = sp.cost(counts + low[t:])
                pressure = min(max((upper - hi) / (upper - lower), 0.0), 1.0) if upper > lower else 0.0
            state = np.concatenate([sp.static[t], [1.0 - upper, prev, feature_c, pressure]]).astype(np.float32)
            a = float(propose(state))
            size = sp.groups[sp.walked[t]].size
            k = clip_count((self.opts.min_keep + a * span) * size, t, counts, sp.allowed, sp.cost, lo, hi)
            counts.append(k)
            prev = k / size
            states.append(state)
            actions.append(min(max((prev - self.opts.min_keep) / span, 0.0), 1.0) if span > 0 else 1.0)
        return counts, states, actions

    def keep_ratios(self, counts: Sequence[int]) -> dict[str, float]:
        """Kept fraction per walked group name."""
        sp = self.space
        return {sp.groups[i].name: int(k) / sp.groups[i].size for i, k in zip(sp.walked, counts)}

    def recover(self, small: nn.Module, plan: Any) -> None:
        """The cheap recovery of the options (in place), when calibration batches are at hand."""
        if not self.calib or self.opts.recovery == "none":
            return
        if self.opts.recovery == "reconstruct":
            reconstruct(small, self.space.model, plan, self.calib)
        recalibrate_bn(small, self.calib)

    def reward(self, small: nn.Module, kept: float) -> float:
        """The episode's reward for a recovered pruned model keeping ``kept`` of the budget."""
        acc = float(evaluate(small, self.val, topk=(1,))["top1"])
        if self.opts.reward == "accuracy":
            return acc
        return -(1.0 - acc) * math.log(max(kept * self.space.base, 1.0))

    def query(self, c: float, *, recover: bool = True) -> tuple[dict[str, float], MethodResult]:
        """Per-group keep ratios and the pruned model for target ``c`` (fraction kept), from the
        actor without exploration or search. The model is recovered as during the search (BN
        re-calibration by default) when the policy has calibration batches and ``recover``. The
        result keeps a fraction of the budget in ``band(c)`` (within ``2 * width`` below ``c``)
        and is non-decreasing in ``c``. ``info`` holds the target, its grid value and band, the
        ratios, the cost model's and the counted FLOPs / params kept. An unconditioned policy
        answers only its own target."""
        c = float(c)
        if not 0.0 < c <= 1.0:
            raise PruningError(f"cacp: query c={c!r}: need a fraction kept in (0, 1]")
        if not self.opts.conditional and abs(self.grid(c) - self.grid(self.opts.targets[0])) > _EPS:
            raise PruningError(f"cacp: this policy was trained for c={self.opts.targets[0]:g} only "
                               "(conditional=False); train a conditional one for other targets")
        sp = self.space
        counts, _, _ = self.walk(c)
        small, plan = sp.prune(counts)
        if recover:
            self.recover(small, plan)
        x = sp.example_inputs
        lo, hi = self.band(c)
        info: dict[str, Any] = {
            "method": "cacp", "target": c, "kind": sp.kind, "target_grid": hi, "band": [lo, hi],
            "keep": self.keep_ratios(counts), "kept_counts": dict(zip([sp.groups[i].name for i in sp.walked], counts)),
            f"{sp.kind}_kept": sp.cost(counts),
            "measured_flops": float(count_flops(small, x)) / sp.costs.base_flops,
            "measured_params": float(count_params(small)) / sp.costs.base_params,
            "in_training_range": self.opts.targets[0] - _EPS <= c <= self.opts.targets[-1] + _EPS,
            "recovered": bool(recover and self.calib and self.opts.recovery != "none"),
        }
        plan = dataclasses.replace(plan, meta={**plan.meta, "method": "cacp", f"target_{sp.kind}": c})
        return info["keep"], MethodResult(small.eval(), plan, info)

    # -- persistence --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """What :meth:`save` writes to ``policy.json``: format, options, budget kind, the
        pruning options the space was built with, the band width and the walked groups."""
        sp = self.space
        return {"format": _FORMAT, "version": 1, "options": self.opts.to_dict(), "kind": sp.kind,
                "ignore": sp.ignore, "round_to": sp.round_to, "min_channels": sp.min_channels,
                "width": self.width, "state_features": list(STATE_FEATURES), "groups": sp.signature(),
                "history": self.history}

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``policy.safetensors`` (actor and critic) and ``policy.json`` into ``directory``
        as a whole (:func:`prunekit.runtime.atomic_directory`); returns the directory."""
        from safetensors.torch import save_file

        with atomic_directory(directory) as tmp:
            save_file(self.agent.tensors(), str(tmp / POLICY_WEIGHTS))
            (tmp / POLICY_JSON).write_text(json.dumps(self.to_json(), indent=1))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: nn.Module, example_inputs: Any, *,
             loader: Iterable[Any] | None = None, val_loader: Iterable[Any] | None = None) -> CACPPolicy:
        """A policy saved by :meth:`save`, for ``model`` (the original it was trained on) and
        ``example_inputs``. ``loader`` gives the calibration batches of the recovery (without
        it queries are not recovered), ``val_loader`` the reward's. A model whose walked groups
        differ from the saved ones raises :class:`PruningError`; ``model`` is not modified."""
        from safetensors.torch import load_file

        where = readable_directory(directory)
        path = where / POLICY_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{Path(directory) / POLICY_JSON}: no saved cacp policy")
        meta = json.loads(path.read_text())
        if meta.get("format") != _FORMAT:
            raise PruningError(f"{Path(directory) / POLICY_JSON}: not a cacp policy")
        raw = dict(meta["options"])
        raw["targets"] = tuple(raw["targets"])
        opts = CACPOptions(**raw)
        space = _Space(model, example_inputs, kind=meta["kind"], ignore=meta["ignore"], round_to=meta["round_to"],
                       min_channels=meta["min_channels"], min_keep=opts.min_keep)
        if space.signature() != meta["groups"]:
            raise PruningError(f"{directory}: the policy was trained on other groups than this model has "
                               "(another architecture, ignore list or width)")
        agent = _Agent(len(STATE_FEATURES), opts)
        agent.load_tensors(load_file(str(where / POLICY_WEIGHTS)))
        calib = _batches(loader, opts.batches, space.model) if loader is not None else None
        val = _batches(val_loader, opts.val_batches, space.model) if val_loader is not None else None
        return cls(space, agent, opts, width=meta["width"], calib=calib, val=val, history=meta.get("history"))

    def __repr__(self) -> str:
        sp = self.space
        return (f"CACPPolicy({len(sp.walked)} groups, {sp.kind} targets {list(self.opts.targets)}, "
                f"conditional={self.opts.conditional}, width {self.width:.4g}, {len(self.history)} episodes)")


def _batches(loader: Iterable[Any], n: int, model: nn.Module, skip: int = 0) -> list[tuple[Tensor, Any]]:
    """Batches ``skip`` to ``skip + n`` of ``loader`` as a fixed list on the model's device."""
    device = infer_device(model)
    out = []
    for i, item in enumerate(loader):
        if i < skip:
            continue
        if len(out) == n:
            break
        x, y = as_batch(item)
        out.append((to_device(x, device), to_device(y, device)))
    return out


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------

def search(policy: CACPPolicy, *, progress: bool = False) -> list[dict[str, Any]]:
    """Train ``policy``'s agent for ``episodes`` episodes (module docstring, steps 1-5), each
    with a target drawn from the options' ``targets``; returns the per-episode record (target,
    reward, fraction kept, exploring or not, seconds) and keeps it in ``policy.history``."""
    opts, sp, agent = policy.opts, policy.space, policy.agent
    rng = np.random.default_rng(opts.seed)
    sigma = opts.sigma
    warm = opts.warmup_episodes
    for episode in range(opts.episodes):
        t0 = time.perf_counter()
        c = float(opts.targets[rng.integers(len(opts.targets))])
        if episode < warm:
            def propose(state: np.ndarray) -> float:
                return float(rng.uniform(0.0, 1.0))
        else:
            def propose(state: np.ndarray) -> float:
                return _truncated_normal(rng, agent.act(state), sigma)
        counts, states, actions = policy.walk(c, propose)
        small, plan = sp.prune(counts)
        policy.recover(small, plan)
        kept = sp.cost(counts)
        reward = policy.reward(small, kept)
        agent.observe(states, actions, reward)
        losses = None
        if episode >= warm:
            for _ in range(len(states)):
                losses = agent.update(rng)
            sigma *= opts.sigma_decay
        record = {"episode": episode + 1, "target": c, "reward": reward, f"{sp.kind}_kept": kept,
                  "random": episode < warm, "seconds": time.perf_counter() - t0}
        if losses is not None:
            record["critic_loss"], record["actor_loss"] = losses
        policy.history.append(record)
        if progress or log.isEnabledFor(logging.INFO):
            msg = (f"cacp episode {episode + 1}/{opts.episodes}: c={c:g} kept {kept:.4f} reward {reward:.4f}"
                   f"{' (random)' if episode < warm else ''}")
            print(msg) if progress else log.info(msg)
    return policy.history


def build_policy(model: nn.Module, example_inputs: Any, opts: CACPOptions, *, kind: str = "flops",
                 ignore: list[str] | None = None, round_to: int = 1, min_channels: int = 1,
                 loader: Iterable[Any] | None = None, val_loader: Iterable[Any] | None = None) -> CACPPolicy:
    """An untrained policy for ``model``: its search space, the band width, a fresh agent, the
    calibration batches (the first ``batches`` of ``loader``) and the validation batches (of
    ``val_loader``; without one, the ``val_batches`` batches of ``loader`` after the
    calibration ones, recorded as such by the method)."""
    if loader is None:
        raise PruningError("method 'cacp' needs data: pass loader=... (training batches of (inputs, targets)) "
                           "and preferably val_loader=... (the reward's validation batches)")
    space = _Space(model, example_inputs, kind=kind, ignore=ignore, round_to=round_to, min_channels=min_channels,
                   min_keep=opts.min_keep)
    calib = _batches(loader, opts.batches, space.model)
    if val_loader is not None:
        val, source = _batches(val_loader, opts.val_batches, space.model), "val_loader"
    else:
        val, source = _batches(loader, opts.val_batches, space.model, skip=opts.batches), \
            "loader batches after the calibration ones"
        if not val:  # a short loader: the reward is read on the calibration batches themselves
            val, source = calib, "the calibration batches (the loader had no more; pass val_loader=)"
    if not calib or not val:
        raise PruningError("method 'cacp': the loader / val_loader yielded no batches for calibration or the reward")
    width = max(landing_width(space.allowed, space.cost), opts.resolution, 1e-9) * (1 + 1e-9) if space.allowed else 1.0
    policy = CACPPolicy(space, _Agent(len(STATE_FEATURES), opts), opts, width=width, calib=calib, val=val)
    policy.reward_data = source
    return policy


@register("cacp")
def cacp(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
         val_loader: Iterable[Any] | None = None, epochs: int | None = None, train_config: TrainConfig | None = None,
         run_dir: str | os.PathLike[str] | None = None, resume: bool = False, options: CACPOptions | None = None,
         progress: bool = False, **kwargs: Any) -> MethodResult:
    """Search a CACP policy on ``model`` (a copy) and return the pruned model for the budget
    (``target_flops``, the paper's ``c``, or ``target_params``), its plan and ``info`` with the
    trained :class:`CACPPolicy` under ``"policy"`` (``info["policy"].query(c)`` for any other
    target, no new search).

    ``options`` (a :class:`CACPOptions`) and/or its fields as keywords (``episodes``,
    ``targets``, ``conditional``, ``recovery``, ...) set the search; the other keywords are
    budget options (``ignore``, ``round_to``, ``min_channels``, ``config``). ``loader`` gives
    the calibration batches of the recovery, ``val_loader`` the reward's validation batches
    (without it, later batches of ``loader``). ``epochs`` (default none) fine-tunes the
    result on ``loader`` (``train_config``, default SGD lr 0.01 cosine; checkpoints in
    ``run_dir/finetune``); a search finished earlier in ``run_dir`` is loaded when ``resume``."""
    opts, rest = split_options(kwargs, CACPOptions, options, "cacp")
    cfg = budget_config(rest, "cacp")
    target = cfg.target
    if target is None or target[0] == "latency":
        raise PruningError("method 'cacp': pass target_flops=... (the compression rate c) or target_params=...")
    for key in ("ratios", "group_ratios"):
        if getattr(cfg, key):
            raise PruningError(f"method 'cacp': {key} is not an option here (the agent chooses every group's ratio)")
    if cfg.global_ranking:
        raise PruningError("method 'cacp': global_ranking is not an option here (the agent chooses every group's ratio)")
    kind, c = target
    if not opts.conditional:
        opts = dataclasses.replace(opts, targets=(c,))
    ignore = module_names(model, list(cfg.ignore), "ignore") if cfg.ignore else None
    saved = Path(run_dir) / "cacp_policy" if run_dir is not None else None
    t0 = time.perf_counter()
    dropped: list[dict[str, Any]] = []
    if saved is not None and resume and (saved / POLICY_JSON).is_file():
        policy = CACPPolicy.load(saved, model, example_inputs, loader=loader, val_loader=val_loader)
        same = dataclasses.replace(policy.opts, targets=opts.targets) == opts  # unreachable targets were dropped
        if not same or not set(policy.opts.targets) <= set(opts.targets) or policy.space.kind != kind:
            raise PruningError(f"cacp: the policy saved in {saved} was searched with other options; "
                               "remove it or pass the same options")
        resumed = True
    else:
        policy = build_policy(model, example_inputs, opts, kind=kind, ignore=ignore, round_to=cfg.round_to,
                              min_channels=cfg.min_channels, loader=loader, val_loader=val_loader)
        policy.check_target(c)  # before any episode is spent
        feasible = []
        for target_c in opts.targets:
            try:
                policy.check_target(target_c)
                feasible.append(target_c)
            except PruningError as exc:
                dropped.append({"target": target_c, "reason": str(exc)})
        if dropped:  # a search over reachable targets only; the unreachable ones are reported
            log.warning("cacp: dropping unreachable training targets %s", [d["target"] for d in dropped])
            opts = dataclasses.replace(opts, targets=tuple(feasible) or (c,))
            policy.opts = policy.agent.opts = opts
        search(policy, progress=progress)
        if saved is not None:
            policy.save(saved)
        resumed = False
    search_seconds = time.perf_counter() - t0
    _, res = policy.query(c)
    info = res.info
    rewards = [h["reward"] for h in policy.history]
    info.update({
        "policy": policy, "conditional": opts.conditional, "targets": list(opts.targets), "episodes": opts.episodes,
        "warmup": opts.warmup_episodes, "width": policy.width, "walked_groups": len(policy.space.walked),
        "repaired_groups": sorted(policy.space.groups[i].name for i in policy.space.repaired),
        "search_seconds": search_seconds, "search_resumed": resumed, "dropped_targets": dropped,
        "best_reward": max(rewards) if rewards else None,
        "reward_data": policy.reward_data,
        "departures": ["critic regresses the episode reward (Monte Carlo, no target networks)",
                       "two-sided constraint band on a FLOPs grid (query monotone in c)",
                       "groups instead of layers"],
        "trajectory_summary": _summary(policy.history),
    })
    if epochs:
        assert loader is not None  # build_policy checked it
        cfg_t = training_config(train_config, epochs, None)
        result = train(res.model, loader, cfg_t, val_loader=val_loader, progress=progress,
                       run_dir=Path(run_dir) / "finetune" if run_dir is not None else None, resume=resume)
        info["train"] = {"epochs": result.epochs_completed, "history": result.history}
        res = MethodResult(res.model.eval(), res.plan, info)
    return res


def _summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean reward per target over the first and the last quarter of the episodes."""
    out: dict[str, Any] = {}
    if not history:
        return out
    q = max(1, len(history) // 4)
    for name, part in (("first_quarter", history[:q]), ("last_quarter", history[-q:])):
        per: dict[str, list[float]] = {}
        for h in part:
            per.setdefault(f"{h['target']:g}", []).append(h["reward"])
        out[name] = {k: float(np.mean(v)) for k, v in per.items()}
    return out


cacp.trains = True  # type: ignore[attr-defined]
