"""CACP (conditional automated channel pruning): the constraint-guaranteed clip against brute
force, the policy's monotone, on-budget answers, save/load and the method's contract."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit import methods
from prunekit.errors import PruningError
from prunekit.measure import count_flops
from prunekit.methods.cacp import (STATE_FEATURES, CACPOptions, CACPPolicy, build_policy, clip_count, feasible_range,
                                   landing_width)
from prunekit.recover import evaluate, recalibrate_bn
from prunekit.zoo.small_cnn import SmallCNN

# ----------------------------------------------------------------------------- the pure clip


def _chain_instance(rng: np.random.Generator):
    """Random layer costs of a conv chain: kept fractions f_i = k_i / m_i, cost
    = (a0 + sum a_i f_i + sum b_i f_{i-1} f_i + sum d_i f_i^2) / (its value at full width),
    every coefficient >= 0 (what the cost model's FLOPs are), and random allowed counts."""
    n = int(rng.integers(2, 5))
    sizes = [int(rng.integers(2, 6)) for _ in range(n)]
    allowed = []
    for m in sizes:
        lo = int(rng.integers(1, m + 1))
        ks = sorted({lo, m} | {int(v) for v in rng.integers(lo, m + 1, size=m)})
        allowed.append(ks)
    a0 = float(rng.uniform(0, 0.3))
    a, b, d = rng.uniform(0, 1, n), rng.uniform(0, 1, n) * (rng.uniform() < 0.8), rng.uniform(0, 1, n) * (rng.uniform() < 0.3)
    full = a0 + a.sum() + b[1:].sum() + d.sum()

    def cost(counts: np.ndarray) -> float:
        f = np.asarray(counts, dtype=np.float64) / np.asarray(sizes, dtype=np.float64)
        return float((a0 + (a * f).sum() + (b[1:] * f[:-1] * f[1:]).sum() + (d * f * f).sum()) / full)

    return allowed, cost


def _completable(t: int, prefix: list[int], allowed, cost, lo: float, hi: float) -> set[int]:
    """Brute force: the counts of group t after which some choice of all later groups lands in [lo, hi]."""
    ok = set()
    for k in allowed[t]:
        for rest in itertools.product(*allowed[t + 1:]):
            if lo - 1e-12 <= cost(np.array([*prefix, k, *rest])) <= hi + 1e-12:
                ok.add(k)
                break
    return ok


@pytest.mark.parametrize("seed", range(60))
def test_clipped_action_always_leaves_a_feasible_completion(seed: int) -> None:
    """For random layer costs, random targets c and random proposals, the clip's feasible range
    is exactly the brute-force set of counts that still have a completion in [c - w, c], the
    clipped count is the feasible count nearest the proposal, and the walk ends in the band."""
    rng = np.random.default_rng(seed)
    allowed, cost = _chain_instance(rng)
    w = landing_width(allowed, cost) * float(rng.choice([1.0, 1.0, 1.5, 3.0])) + 1e-12
    smallest = cost(np.array([a[0] for a in allowed]))
    hi = float(rng.uniform(smallest, 1.0))
    lo = hi - w
    prefix: list[int] = []
    for t in range(len(allowed)):
        truth = _completable(t, prefix, allowed, cost, lo, hi)
        assert truth, "the walk lost feasibility"
        rng_t = feasible_range(t, prefix, allowed, cost, lo, hi)
        assert rng_t is not None
        assert set(allowed[t][rng_t[0]:rng_t[1] + 1]) == truth
        proposal = float(rng.uniform(0, max(allowed[t]) + 1))
        k = clip_count(proposal, t, prefix, allowed, cost, lo, hi)
        assert k in truth and all(abs(k - proposal) <= abs(o - proposal) for o in truth)
        prefix.append(k)
    assert lo - 1e-12 <= cost(np.array(prefix)) <= hi + 1e-12


def test_a_band_narrower_than_the_landing_width_can_strand_the_walk() -> None:
    """The width matters: one group of 2 channels costing 0.5 each cannot land in a 0.1 band at
    0.7, and landing_width says the band must be 0.5 wide."""
    allowed = [[1, 2]]

    def cost(c: np.ndarray) -> float:
        return 0.5 * float(c[0]) / 2 * 2

    assert landing_width(allowed, cost) == pytest.approx(0.5)
    assert feasible_range(0, [], allowed, cost, 0.6, 0.7) is None
    with pytest.raises(ValueError):
        clip_count(1.5, 0, [], allowed, cost, 0.6, 0.7)


# ----------------------------------------------------------------------------- the policy


def _data(n: int = 96, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = (x[:, 0, :8].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :8].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    m = SmallCNN(in_chans=1, num_classes=4, widths=(16, 32, 64))
    with torch.no_grad():  # non-trivial BN statistics, so that recalibration changes something
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


X = torch.randn(1, 1, 16, 16)
TINY = dict(episodes=4, warmup=2, hidden=16, batch_size=8, batches=2, val_batches=2)


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, methods.MethodResult]:
    model = _model()
    res = methods.get("cacp")(model, X, loader=_data(), val_loader=_data(32, seed=1), target_flops=0.5, **TINY)
    return model, res


@pytest.mark.parametrize("seed", [0, 1])
def test_query_flops_are_monotone_in_c_and_in_the_band(seed: int) -> None:
    """Whatever the actor's weights (untrained, two seeds), the FLOPs counted on the queried
    models never fall as c grows (c on a grid finer than the band too) and lie in (c - 2w, c]."""
    model = _model()
    policy = build_policy(model, X, CACPOptions(seed=seed, hidden=16, batches=1, val_batches=1), loader=_data(32))
    base = count_flops(model, X)
    cs = sorted(set(np.round(np.linspace(0.25, 0.75, 9), 6)) | {0.5, 0.5 + policy.width / 3, 0.5 + policy.width / 2})
    got = []
    for c in cs:
        _, res = policy.query(float(c), recover=False)
        kept = count_flops(res.model, X) / base
        assert c - 2 * policy.width < kept <= c + 1e-9
        got.append(kept)
    assert all(b >= a - 1e-12 for a, b in zip(got, got[1:]))
    assert policy.width < 0.005  # this net lands finely: the band is a fraction of a percent


def test_result_is_on_target_and_the_users_model_untouched(trained) -> None:
    model, res = trained
    fresh = _model()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    kept = count_flops(res.model, X) / count_flops(model, X)
    assert 0.5 * 0.98 <= kept <= 0.5
    assert res.info["measured_flops"] == pytest.approx(kept) and res.info["flops_kept"] == pytest.approx(kept)
    assert isinstance(res.info["policy"], CACPPolicy) and len(res.info["policy"].history) == 4
    assert {h["target"] for h in res.info["policy"].history} <= {0.3, 0.5, 0.7}
    # The plan is relative to the original: saving and loading rebuilds the same model.
    small = res.model
    assert small(X).shape == (1, 4)


def test_reward_is_top1_of_the_bn_recalibrated_pruned_model(trained) -> None:
    """Oracle of one episode's reward: prune by group *names* (the index path is the method's),
    re-estimate BN on the calibration batches, top-1 on the validation batches."""
    model, res = trained
    policy = res.info["policy"]
    counts, _, _ = policy.walk(0.5)
    sp = policy.space
    ratios = {sp.groups[i].name: sp.requests[i][k] / sp.groups[i].size for i, k in zip(sp.walked, counts)}
    small = pk.prune(model, X, ratio=0.0, group_ratios=ratios)
    recalibrate_bn(small, policy.calib)
    want = evaluate(small, policy.val, topk=(1,))["top1"]
    got, plan = sp.prune(counts)
    policy.recover(got, plan)
    assert policy.reward(got, sp.cost(counts)) == pytest.approx(want)
    assert len(policy.calib) == 2 and len(policy.val) == 2


def test_save_and_load_give_identical_queries(trained, tmp_path) -> None:
    model, res = trained
    policy = res.info["policy"]
    policy.save(tmp_path / "pol")
    assert sorted(p.name for p in (tmp_path / "pol").iterdir()) == ["policy.json", "policy.safetensors"]
    loaded = CACPPolicy.load(tmp_path / "pol", _model(), X, loader=_data(), val_loader=_data(32, seed=1))
    for c in (0.35, 0.5, 0.62):
        (ka, a), (kb, b) = policy.query(c), loaded.query(c)
        assert ka == kb
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(PruningError, match="other groups"):
        CACPPolicy.load(tmp_path / "pol", SmallCNN(in_chans=1, num_classes=4, widths=(16, 32, 48)), X)


def test_unconditioned_mode_trains_for_its_target_only() -> None:
    model = _model()
    res = methods.get("cacp")(model, X, loader=_data(64), target_flops=0.4, conditional=False,
                              **{**TINY, "episodes": 2, "warmup": 1})
    policy = res.info["policy"]
    assert policy.opts.targets == (0.4,) and {h["target"] for h in policy.history} == {0.4}
    target = STATE_FEATURES.index("target")
    assert all(s[target] == 0.0 for s in policy.walk(0.4)[1])  # the target feature is off
    assert 0.4 * 0.98 <= res.info["measured_flops"] <= 0.4
    with pytest.raises(PruningError, match="trained for c=0.4 only"):
        policy.query(0.6)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(ratio=0.5), "target_flops"),
    (dict(target_flops=0.5, recovery="magic"), "recovery='magic'"),
    (dict(target_flops=0.5, group_ratios={0: 0.5}), "group_ratios"),
    (dict(target_flops=0.01), "cannot be met"),
])
def test_bad_options_are_named(kwargs, needle) -> None:
    with pytest.raises(PruningError, match=needle):
        methods.get("cacp")(_model(), X, loader=_data(64), **{**TINY, "episodes": 1}, **kwargs)


def test_the_embedding_carries_c_and_the_budget_pressure(trained) -> None:
    """At the first group nothing is decided: the cost removed so far is 0, the target feature is
    c, and the pressure is (1 - c_grid) / (1 - smallest reachable); each later state's
    "removed so far" is 1 - the cost with the groups decided so far and the rest whole."""
    _, res = trained
    policy = res.info["policy"]
    counts, states, _ = policy.walk(0.5)
    f = {name: i for i, name in enumerate(STATE_FEATURES)}
    first = states[0]
    assert first[f["cost_removed_so_far"]] == pytest.approx(0.0, abs=1e-7)
    assert first[f["target"]] == pytest.approx(0.5)
    assert first[f["budget_pressure"]] == pytest.approx((1 - policy.grid(0.5)) / (1 - policy.smallest), rel=1e-5)
    full = [a[-1] for a in policy.space.allowed]
    for t in range(1, len(states)):
        want = 1 - policy.space.cost(counts[:t] + full[t:])
        assert states[t][f["cost_removed_so_far"]] == pytest.approx(want, abs=1e-6)
        assert states[t][f["previous_keep"]] == pytest.approx(counts[t - 1] / policy.space.groups[policy.space.walked[t - 1]].size)
