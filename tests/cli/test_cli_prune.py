"""`prunekit prune | profile | graph` from the shell's point of view (in-process)."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit as pk
from prunekit.cli.main import main


def test_prune_writes_model_and_report(tmp_path, capsys) -> None:
    out = tmp_path / "r20"
    (tmp_path / "r20").mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["prune", "--model", "resnet20", "--ratio", "0.5", "--out", str(out), "--no-latency"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["params"] < 0.4 * report["before"]["params"]
    assert 0.15 < report["after"]["flops"] / report["before"]["flops"] < 0.4
    assert (out / "keep.txt").read_text() == "mine"
    assert "groups" in capsys.readouterr().out
    small = pk.load(out).eval()
    x = torch.randn(1, 3, 32, 32)
    assert small(x).shape == (1, 10)
    assert sum(p.numel() for p in small.parameters()) == report["after"]["params"]


@pytest.mark.parametrize("argv,needle", [
    (["prune", "--model", "nope:thing", "--out", "X"], "--model nope:thing"),
    (["prune", "--model", "resnet_does_not_exist", "--out", "X"], "resnet_does_not_exist"),
    (["prune", "--model", "resnet20", "--ratio", "1.5", "--out", "X"], "--ratio 1.5"),
    (["prune", "--model", "resnet20", "--ignore", "layer9", "--out", "X"], "layer9"),
    (["prune", "--model", "resnet20", "--input-shape", "1,x", "--out", "X"], "--input-shape"),
])
def test_bad_input_exits_2_naming_the_problem(argv, needle, tmp_path, capsys) -> None:
    argv = [a if a != "X" else str(tmp_path / "o") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_graph_and_profile(capsys) -> None:
    assert main(["graph", "--model", "resnet20"]) == 0
    assert "layer1.0.conv1" in capsys.readouterr().out
    assert main(["profile", "--model", "resnet20", "--no-latency", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["params"] == sum(p.numel() for p in pk.zoo.resolve_model("resnet20").parameters())


def test_prune_with_a_method_and_calibration_data(tmp_path) -> None:
    """`--method cap` compensates in closed form: the saved model is not the plain slice."""
    out = tmp_path / "cap"
    rc = main(["prune", "--model", "small_cnn", "--in-chans", "1", "--input-shape", "1,1,8,8", "--data", "digits",
               "--method", "cap", "--target-params", "0.5", "--calib-batches", "2", "--out", str(out), "--no-latency"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "cap"
    assert 0.49 <= report["after"]["params"] / report["before"]["params"] <= 0.5
    plan = pk.persist.load_plan(out)
    assert plan.meta["method"] == "cap"


@pytest.mark.parametrize("argv,needle", [
    (["--method", "cap"], "--method cap needs calibration data"),
    (["--criterion", "taylor"], "--criterion taylor needs calibration data"),
    (["--method", "nope", "--data", "digits"], "unknown method 'nope'"),
])
def test_data_driven_pruning_needs_data(argv, needle, tmp_path, capsys) -> None:
    rc = main(["prune", "--model", "small_cnn", "--in-chans", "1", "--input-shape", "1,1,8,8", *argv,
               "--out", str(tmp_path / "o"), "--no-latency"])
    assert rc == 2
    assert needle in capsys.readouterr().err
