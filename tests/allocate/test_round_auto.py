"""round_to="auto": the channel multiple chosen from a width table, on recorded (hand-made)
timings only: nothing here is timed. The oracle re-prunes with every integer multiple and sums
the hand-made timer over the result's layers by itself."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.allocate.rounding import CANDIDATES, TIE
from prunekit.errors import PruningError, PruningShortfallWarning
from prunekit.measure import count_flops
from prunekit.measure.width_table import LayerSpec, WidthTable, build_width_table

X = torch.randn(1, 3, 16, 16)
LAYERS = ("0", "2", "4", "8")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10)).eval()


def _work(m: nn.Module, cin: int, cout: int) -> float:
    """Multiply-adds of layer ``m`` at widths (cin, cout) on X's 16x16 maps."""
    if isinstance(m, nn.Conv2d):
        return cin * cout * 9 * 16 * 16 / 1e6
    return cin * cout / 1e6


def odd_slow(spec: LayerSpec, cin: int, cout: int) -> float:
    """Time follows the work, three times slower when a width is not a multiple of 8."""
    return _work(spec.module, cin, cout) * (3.0 if cin % 8 or cout % 8 else 1.0)


def flat(spec: LayerSpec, cin: int, cout: int) -> float:
    """Time follows the work exactly: rounding buys nothing."""
    return _work(spec.module, cin, cout)


def any_cut_slow(spec: LayerSpec, cin: int, cout: int) -> float:
    """Every narrowed layer runs at a third of its speed: no pruned variant is faster."""
    full = (cin, cout) == (spec.in_channels, spec.out_channels)
    return _work(spec.module, cin, cout) * (1.0 if full else 3.0)


def _oracle_ms(model: nn.Module, small: nn.Module, timer) -> float:
    """The estimate, summed by hand: the timer over ``small``'s layers, scaled to the original."""
    def total(net: nn.Module) -> float:
        out = 0.0
        for name in LAYERS:
            orig, m = model.get_submodule(name), net.get_submodule(name)
            cin, cout = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            ocin, ocout = ((orig.in_channels, orig.out_channels) if isinstance(orig, nn.Conv2d)
                           else (orig.in_features, orig.out_features))
            spec = LayerSpec(name, name, ocin, ocout, (), 1, orig)
            out += timer(spec, cin, cout)
        return out
    return total(small) / total(model)  # as a fraction of the original's latency


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("removed", [0.05, 0.1, 0.3, 0.5, 0.7])
def test_auto_picks_8_when_odd_widths_are_slow(removed: float) -> None:
    model = _net()
    target = 1 - removed
    table = build_width_table(model, X, timer=odd_slow)
    small, plan = pk.prune(model, X, ignore=["8"], target_flops=target, round_to="auto", width_table=table,
                           return_plan=True)
    auto = plan.meta["round_to_auto"]
    assert plan.meta["round_to"] == auto["chosen"] == 8
    assert all(w % 8 == 0 for w in _widths(small))
    assert count_flops(small, X) <= target * count_flops(model, X) * (1 + 1e-9)
    # Faster than the original, by the table and by the oracle's own sum.
    assert table.estimate(small) < table.estimate(model)
    assert _oracle_ms(model, small, odd_slow) < 1.0
    # Each candidate's record equals pruning with that integer multiple, estimated by hand.
    for m in CANDIDATES:
        row = auto["candidates"][str(m)]
        if "error" in row:
            continue
        ref = pk.prune(model, X, ignore=["8"], target_flops=target, round_to=m)
        assert row["estimated_ms"] == pytest.approx(_oracle_ms(model, ref, odd_slow) * auto["original_ms"])
        assert row["refused"] == (_oracle_ms(model, ref, odd_slow) > 1.0)
    # The rule, applied by hand to the recorded scores.
    ok = {int(m): r["score"] for m, r in auto["candidates"].items() if "score" in r and not r["refused"]}
    assert auto["chosen"] == min(m for m, s in ok.items() if s <= min(ok.values()) * (1 + TIE))
    assert auto["candidates"]["1"]["refused"] or removed >= 0.5  # odd widths from m=1 cost 3x


def test_auto_with_the_knapsack_allocation() -> None:
    """The knapsack is re-run per multiple too. Here m=4's knapsack lands on widths that are all
    multiples of 8 anyway, closer to the budget than m=8's: the rule takes it, and no odd width."""
    model = _net()
    table = build_width_table(model, X, timer=odd_slow)
    kw = dict(ignore=["8"], target_flops=0.6, allocation="knapsack")
    small, plan = pk.prune(model, X, round_to="auto", width_table=table, return_plan=True, **kw)
    chosen = plan.meta["round_to"]
    assert all(w % 8 == 0 for w in _widths(small)) and table.estimate(small) < table.estimate(model)
    assert count_flops(small, X) <= 0.6 * count_flops(model, X) * (1 + 1e-9)
    assert _widths(small) == _widths(pk.prune(model, X, round_to=chosen, **kw))
    rows = plan.meta["round_to_auto"]["candidates"]
    assert rows["1"]["refused"]
    ok = {int(m): r["score"] for m, r in rows.items() if "score" in r and not r["refused"]}
    assert chosen == min(m for m, s in ok.items() if s <= min(ok.values()) * (1 + TIE))


def test_auto_picks_1_without_a_rounding_effect() -> None:
    model = _net()
    table = build_width_table(model, X, timer=flat)
    small, plan = pk.prune(model, X, ignore=["8"], target_flops=0.5, round_to="auto", width_table=table,
                           return_plan=True)
    assert plan.meta["round_to"] == 1
    ref = pk.prune(model, X, ignore=["8"], target_flops=0.5)  # the plain allocation, unrounded
    assert _widths(small) == _widths(ref)
    # Latency follows FLOPs here, so coarser multiples score within the tie band, not better.
    rows = plan.meta["round_to_auto"]["candidates"]
    assert all(r["score"] >= rows["1"]["score"] * (1 - TIE) for r in rows.values() if "score" in r)


def test_auto_keeps_1_and_warns_when_every_variant_is_slower() -> None:
    model = _net()
    table = build_width_table(model, X, timer=any_cut_slow)
    with pytest.warns(PruningShortfallWarning, match="round_to='auto': every candidate"):
        small, plan = pk.prune(model, X, ignore=["8"], target_flops=0.7, round_to="auto", width_table=table,
                               return_plan=True)
    auto = plan.meta["round_to_auto"]
    assert plan.meta["round_to"] == auto["chosen"] == 1 and "warning" in auto
    assert all(r["refused"] for r in auto["candidates"].values() if "refused" in r)
    assert _widths(small) == _widths(pk.prune(model, X, ignore=["8"], target_flops=0.7))


def test_auto_with_a_ratio_and_a_timer_callable() -> None:
    """A ratio prune rounds kept counts up; the timer can be given bare (no table). At ratio 0.4
    the 32-wide layer keeps 20 with m=4 (slow) and 24 with m=8."""
    model = _net()
    small, plan = pk.prune(model, X, ignore=["8"], ratio=0.4, round_to="auto", width_table=odd_slow,
                           return_plan=True)
    assert plan.meta["round_to"] == 8 and plan.meta["round_to_auto"]["quantity"] == "channels"
    assert _widths(small) == _widths(pk.prune(model, X, ignore=["8"], ratio=0.4, round_to=8)) == [24, 40, 40]


def test_a_recorded_table_answers_without_a_timer() -> None:
    """Saved to JSON and loaded without modules or timer, the table gives the same choice."""
    model = _net()
    table = build_width_table(model, X, timer=odd_slow)
    first = pk.plan_for(model, X, ignore=["8"], target_flops=0.5, round_to="auto", width_table=table)
    loaded = WidthTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert loaded.timer is None and all(s.module is None for s in loaded.layers.values())
    again = pk.plan_for(model, X, ignore=["8"], target_flops=0.5, round_to="auto", width_table=loaded)
    assert again.meta["round_to_auto"] == first.meta["round_to_auto"]
    # A width the recording lacks is an error naming the layer, not a guess.
    with pytest.raises(ValueError, match="no timing of layer '2' at widths"):
        loaded.layer_ms("2", 32, 63)


def test_width_table_for_another_model_is_refused() -> None:
    table = build_width_table(_net(), X, timer=flat)
    other = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, padding=1))
    with pytest.raises(PruningError, match="width_table: layer '0' is \\(3, 32\\) in the table"):
        pk.prune(other, X, ratio=0.5, round_to="auto", width_table=table)


def test_bad_round_options() -> None:
    with pytest.raises(PruningError, match="round_to='eight': must be an integer >= 1 or 'auto'"):
        pk.PruneConfig(round_to="eight")
    with pytest.raises(PruningError, match="width_table: only used with round_to='auto'"):
        pk.PruneConfig(round_to=8, width_table=flat)
    with pytest.raises(PruningError, match="round_backend='tensorrt'"):
        pk.PruneConfig(round_to="auto", round_backend="tensorrt")
    from prunekit.allocate import select

    with pytest.raises(PruningError, match="round_to='auto': this allocation takes an integer"):
        select([], [], ratio=0.5, round_to="auto")


def test_int_round_to_unchanged() -> None:
    """An integer round_to prunes exactly as before (no auto record)."""
    model = _net()
    small, plan = pk.prune(model, X, ignore=["8"], ratio=0.3, round_to=8, return_plan=True)
    assert plan.meta["round_to"] == 8 and "round_to_auto" not in plan.meta
    # floor(0.3 * 32) = 9 removed -> 23 kept -> 24; floor(0.3 * 64) = 19 -> 45 kept -> 48.
    assert _widths(small) == [24, 48, 48]


def test_cli_round_to_auto(tmp_path) -> None:
    """`prunekit prune --round-to auto` (tiny model; the CLI times the layers, the test asserts
    only what holds whatever the timings)."""
    from prunekit.cli.main import main

    out = tmp_path / "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningShortfallWarning)  # a slow, loaded machine may refuse all
        rc = main(["prune", "--model", "small_cnn", "--in-chans", "1", "--input-shape", "1,1,8,8",
                   "--target-flops", "0.6", "--round-to", "auto", "--out", str(out), "--no-latency"])
    assert rc == 0
    plan = json.loads((out / "plan.json").read_text())
    auto = plan["meta"]["round_to_auto"]
    assert plan["meta"]["round_to"] == auto["chosen"] in CANDIDATES and auto["backend"] == "eager"
    chosen = auto["chosen"]
    original = [m.out_channels for m in pk.zoo.resolve_model("small_cnn", in_chans=1).modules()
                if isinstance(m, nn.Conv2d)]
    pruned = [m.out_channels for m in pk.load(out).modules() if isinstance(m, nn.Conv2d)]
    # Every pruned width is a multiple of the chosen one (a layer left whole keeps its width).
    assert all(w % chosen == 0 or w == o for w, o in zip(pruned, original)) and pruned != original


def test_cli_round_to_rejects_words(tmp_path, capsys) -> None:
    from prunekit.cli.main import main

    with pytest.raises(SystemExit):
        main(["prune", "--model", "small_cnn", "--round-to", "eight", "--out", str(tmp_path / "o")])
    assert "an integer or 'auto'" in capsys.readouterr().err
