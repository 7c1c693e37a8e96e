"""How much of a model its unprunable channels hold (``graph.unprunable_cost``,
``plan.meta["unprunable"]``, the CLI's note), against parameter counts worked out by hand."""

from __future__ import annotations

import json

import torch
from torch import nn

import prunekit as pk
from prunekit.cli.main import main

NET = '''
import torch
from torch import nn


class ScaledByWidth(nn.Module):
    """conv a -> y * C ** -0.5 (C read from y: a's channels must stay) -> conv b -> conv c."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y * y.shape[1] ** -0.5
        return self.c(torch.relu(self.b(y)))


def build():
    return ScaledByWidth()
'''

# a.weight 8*3*3*3 + a.bias 8 + b.weight 8*8*3*3 + b.bias 8 + c.weight 4*8 + c.bias 4
TOTAL = 216 + 8 + 576 + 8 + 32 + 4
# a's 8 channels: all of a, and b.weight along its inputs (every element of it).
A_HELD = 216 + 8 + 576
# c's 4 outputs (ignored): c.weight and c.bias.
C_HELD = 32 + 4


def _model(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    import importlib.util

    spec = importlib.util.spec_from_file_location("net_cost", tmp_path / "net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build().eval()


def test_the_share_each_reason_holds_matches_a_hand_count(tmp_path) -> None:
    model = _model(tmp_path)
    graph = pk.trace(model, torch.randn(1, 3, 8, 8), ignore=["c"])
    cost = graph.unprunable_cost(model)
    # b.weight's elements are held by a's channels (inputs) and counted once; b.bias is free.
    assert abs(cost["params_share"] - (A_HELD + C_HELD) / TOTAL) < 1e-12
    first, second = cost["reasons"]
    assert "used as a value" in first["reason"] and first["channels"] == 8 and first["groups"] == ["a"]
    assert abs(first["params_share"] - A_HELD / TOTAL) < 1e-12
    assert second["reason"] == "module 'c' is in ignore" and second["channels"] == 4
    assert second["ignored"] and not first["ignored"]
    assert abs(second["params_share"] - C_HELD / TOTAL) < 1e-12


def test_a_fully_prunable_model_holds_nothing() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    graph = pk.trace(model, torch.randn(1, 3, 8, 8), ignore=[model[2]])
    cost = graph.unprunable_cost(model)
    assert [r["reason"] for r in cost["reasons"]] == ["module '2' is in ignore"]
    assert abs(cost["params_share"] - (8 * 4 + 4) / (8 * 27 + 8 + 36)) < 1e-12


def test_the_cli_names_the_op_and_the_share_that_stays(tmp_path, capsys) -> None:
    _model(tmp_path)
    out = tmp_path / "o"
    rc = main(["prune", "--model", f"{tmp_path / 'net.py'}:build", "--ratio", "0.5", "--input-shape", "1,3,8,8",
               "--ignore", "c", "--out", str(out), "--no-latency"])
    assert rc == 0
    err = capsys.readouterr().err
    share = 100 * A_HELD / TOTAL
    assert f"{100 * (A_HELD + C_HELD) / TOTAL:.1f}% of the parameters touch channels that cannot be pruned" in err
    assert f"{share:.1f}% of the parameters, 8 channels (a): a channel count read from a tensor's shape" in err
    assert "'mul'" in err and "in ignore" not in err  # the user's own choice is not reported
    plan = json.loads((out / "report.json").read_text())["plan"]
    assert abs(plan["unprunable"]["params_share"] - (A_HELD + C_HELD) / TOTAL) < 1e-12
