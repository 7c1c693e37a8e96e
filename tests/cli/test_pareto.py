"""`prunekit pareto`: one model per budget on its budget, the front, resume after a kill, unreachable budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import prunekit as pk
from prunekit.cli import pareto as pareto_cli
from prunekit.cli.main import main
from prunekit.measure import count_flops
from prunekit.zoo import resolve_model

BASE = ["pareto", "--model", "small_cnn", "--data", "digits", "--no-progress", "--finetune-epochs", "0",
        "--calib-batches", "2", "--batch-size", "32"]


def _state(out) -> dict:
    return json.loads((out / "pareto.json").read_text())


def _records(out) -> dict[float, dict]:
    return {r["budget"]: r for r in _state(out)["records"]}


@pytest.mark.parametrize("seed", range(40))
def test_front_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    pts = [(float(rng.integers(0, 5)), float(rng.integers(0, 5))) for _ in range(n)]  # many ties
    want = [i for i, (c, a) in enumerate(pts)
            if not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in pts)]
    assert pareto_cli.pareto_front(pts) == want


def test_budgets_are_parsed_and_checked() -> None:
    assert pareto_cli.parse_budgets("0.7,0.3, 0.5,0.3") == [0.3, 0.5, 0.7]
    for bad in ("", "0.5,x", "0,0.5", "1.5"):
        with pytest.raises(pareto_cli.CliError, match="--budgets"):
            pareto_cli.parse_budgets(bad)


def test_one_model_per_budget_on_budget_and_an_unreachable_one_reported(tmp_path, capsys) -> None:
    """Each budget's saved model loads alone and keeps at most its FLOPs budget (within 2%);
    0.001 cannot be met with --min-channels 4: a row says so and a warning is printed."""
    out = tmp_path / "p"
    rc = main([*BASE, "--budgets", "0.3,0.6,0.001", "--min-channels", "4", "--out", str(out), "--threads", "1",
               "--latency-time", "0.05"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: budget 0.001 cannot be met" in err
    recs = _records(out)
    assert recs[0.001]["status"] == "infeasible" and "cannot be met" in recs[0.001]["reason"]
    assert not (out / "budget_0.001").exists()
    md = (out / "pareto.md").read_text()
    assert "| 0.001 | **infeasible** |" in md and "Budgets that cannot be met" in md
    x = torch.randn(1, 1, 16, 16)
    base = count_flops(resolve_model("small_cnn", in_chans=1), x)
    for b in (0.3, 0.6):
        rec = recs[b]
        small = pk.load(out / rec["dir"])
        kept = count_flops(small, x) / base
        assert b - 0.02 <= kept <= b and rec["flops_kept"] == pytest.approx(kept)
        assert set(rec["latency_ms"]) == {"1", "16"} and all(v > 0 for v in rec["latency_ms"].values())
        assert 0.0 <= rec["top1"] <= 1.0 and rec["onnx"] in ("model.onnx", "skipped (onnx / onnxruntime not installed)")
        assert (out / rec["dir"] / "model.onnx").is_file() == (rec["onnx"] == "model.onnx")
    state = _state(out)
    assert state["reference"]["flops"] == base
    # The fronts recorded are the brute-force fronts of the measured points.
    pts = [state["reference"]] + [recs[b] for b in (0.3, 0.6)]
    for key, cost in (("flops", lambda p: p["flops"]), ("latency", lambda p: p["latency_ms"]["1"])):
        want = [p["budget"] for p in pts if not any(cost(q) <= cost(p) and q["top1"] >= p["top1"]
                                                     and (cost(q) < cost(p) or q["top1"] > p["top1"]) for q in pts)]
        assert sorted(state["front"][key]) == sorted(want)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_a_kill_does_not_redo_finished_budgets(tmp_path, monkeypatch, capsys) -> None:
    """Killed during its second budget, a run leaves the first recorded; `--resume` with one
    more budget keeps that record and its model files as they were and runs the other two."""
    out = tmp_path / "p"
    argv = [*BASE, "--no-latency", "--no-onnx", "--out", str(out)]
    original = pareto_cli._Run.one_budget
    calls = []

    def killed(self, budget, *a, **k):
        calls.append(budget)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, budget, *a, **k)

    monkeypatch.setattr(pareto_cli._Run, "one_budget", killed)
    assert main([*argv, "--budgets", "0.5,0.7"]) == 130
    monkeypatch.setattr(pareto_cli._Run, "one_budget", original)
    first = _records(out)
    assert list(first) == [0.5] and first[0.5]["status"] == "done"
    weights = out / "budget_0.5" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    redone = []
    monkeypatch.setattr(pareto_cli._Run, "one_budget",
                        lambda self, budget, *a, **k: (redone.append(budget), original(self, budget, *a, **k))[1])
    assert main([*argv, "--budgets", "0.4,0.5,0.7", "--resume"]) == 0
    assert redone == [0.4, 0.7]
    second = _records(out)
    assert second[0.5] == {**first[0.5], "front_latency": second[0.5]["front_latency"],
                           "front_flops": second[0.5]["front_flops"]}
    assert weights.stat().st_mtime_ns == stamp
    assert [r["status"] for r in second.values()] == ["done"] * 3
    assert "1 finished before, not redone" in capsys.readouterr().out
    # Other settings are refused on resume.
    assert main([*argv, "--budgets", "0.4", "--resume", "--criterion", "l1"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_cacp_policy_is_searched_once_and_queried_per_budget(tmp_path) -> None:
    """One search (episodes recorded once, saved in OUT/policy) serves every budget; on resume
    the saved policy is loaded, not searched again, and answers the new budget on budget."""
    out = tmp_path / "c"
    argv = [*BASE, "--method", "cacp", "--episodes", "3", "--val-size", "40", "--no-latency", "--no-onnx",
            "--subset", "200", "--out", str(out)]
    assert main([*argv, "--budgets", "0.4,0.6"]) == 0
    state = _state(out)
    assert state["policy"]["searched_in_this_run"] and state["policy"]["episodes"] == 3
    policy_json = json.loads((out / "policy" / "policy.json").read_text())
    assert policy_json["options"]["targets"] == [0.4, 0.6] and len(policy_json["history"]) == 3
    stamp = (out / "policy" / "policy.safetensors").stat().st_mtime_ns
    for b in (0.4, 0.6):
        rec = _records(out)[b]
        assert b - 0.02 <= rec["flops_kept"] <= b and rec["method_info"]["target"] == b
    assert main([*argv, "--budgets", "0.4,0.5,0.6", "--resume"]) == 0
    state = _state(out)
    assert not state["policy"]["searched_in_this_run"]
    assert (out / "policy" / "policy.safetensors").stat().st_mtime_ns == stamp
    rec = _records(out)[0.5]
    assert 0.48 <= rec["flops_kept"] <= 0.5 and rec["method_info"]["in_training_range"]
