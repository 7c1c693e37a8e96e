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


@pytest.mark.parametrize("method", ["cap", "svd", "block_drop"])
def test_a_spec_model_takes_its_channels_and_input_size_from_the_data(method, tmp_path, capsys) -> None:
    """No --in-chans / --input-shape: the model is built for the 1-channel 16 px digits it is calibrated on."""
    out = tmp_path / method
    rc = main(["prune", "--model", "small_cnn", "--data", "digits", "--method", method, "--target-flops", "0.7",
               "--calib-batches", "2", "--out", str(out), "--no-latency"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input_shape"] == [1, 1, 16, 16]
    assert report["after"]["flops"] < report["before"]["flops"]
    assert ("replaced" in capsys.readouterr().out) == (method == "svd")  # the summary says what the plan did


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


TRAINING = ["--model", "small_cnn", "--in-chans", "1", "--data", "digits", "--target-flops", "0.5", "--subset", "100",
            "--batch-size", "50", "--no-latency", "--no-progress"]


def test_prune_with_a_training_method(tmp_path) -> None:
    """`--method scp --epochs 1 --val-size 40`: trained on digits, the report holds the
    method's info (trajectory, budget), the plot is written and the checkpoints are gone."""
    out = tmp_path / "scp"
    rc = main(["prune", *TRAINING, "--method", "scp", "--epochs", "1", "--val-size", "40", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "scp" and report["recipe"]["finetune_epochs"] == 1
    info = report["method_info"]
    assert [t["epoch"] for t in info["trajectory"]] == [1]
    assert "val_top1" in info["train"]["history"][0]  # --val-size gave a held-out loader
    kept = report["after"]["flops"] / report["before"]["flops"]
    assert 0.49 <= kept <= 0.5 and abs(info["budget"]["measured_flops"] - kept) < 1e-9
    assert (out / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / ".scp.training").exists()
    assert "scp" in (out / "report.md").read_text()


def test_prune_with_autopruner(tmp_path) -> None:
    """`--method autopruner --epochs 1`: selection layers trained layer by layer on digits,
    pruned to the budget and fine-tuned; the report holds the freeze records."""
    out = tmp_path / "ap"
    assert main(["prune", *TRAINING, "--method", "autopruner", "--epochs", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    info = report["method_info"]
    assert report["method"] == "autopruner" and info["train"]["epochs"] == 1 and info["finetune"]["epochs"] == 1
    assert set(info["frozen"]) == {r["group"] for r in info["layers"]}
    kept = report["after"]["flops"] / report["before"]["flops"]
    assert 0.49 <= kept <= 0.5 and abs(info["budget"]["measured_flops"] - kept) < 1e-9
    assert not (tmp_path / ".ap.training").exists()


def test_prune_with_colombo_gao(tmp_path) -> None:
    """`--method colombo_gao --epochs 1`: architecture variables searched on digits with the
    weights frozen, the extracted architecture on the budget, the report holding the search."""
    out = tmp_path / "cg"
    assert main(["prune", *TRAINING, "--method", "colombo_gao", "--epochs", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    info = report["method_info"]
    assert report["method"] == "colombo_gao" and info["train"]["epochs"] == 1 and info["weights"].startswith("frozen")
    kept = report["after"]["flops"] / report["before"]["flops"]
    assert 0.49 <= kept <= 0.5 and abs(info["budget"]["measured_flops"] - kept) < 1e-9
    assert not (tmp_path / ".cg.training").exists()


def test_a_killed_training_method_resumes_from_the_hidden_run_directory(tmp_path, monkeypatch, capsys) -> None:
    """A run killed in its second epoch leaves .OUT.training; --resume finishes it with the
    same weights as a run that was never killed; --resume without it is refused."""
    from prunekit.methods import _training

    assert main(["prune", *TRAINING, "--method", "dais", "--epochs", "2", "--out", str(tmp_path / "whole")]) == 0
    assert main(["prune", *TRAINING, "--method", "dais", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "--resume: no checkpoint.pt in" in capsys.readouterr().err
    original = _training.Trajectory.on_epoch_end

    def killed(self, model, epoch, record):  # dies after epoch 1's checkpoint, during epoch 2's
        if epoch == 2:
            raise KeyboardInterrupt
        original(self, model, epoch, record)

    monkeypatch.setattr(_training.Trajectory, "on_epoch_end", killed)
    assert main(["prune", *TRAINING, "--method", "dais", "--epochs", "2", "--out", str(tmp_path / "cut")]) == 130
    assert (tmp_path / ".cut.training" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "plan.json").exists()
    monkeypatch.setattr(_training.Trajectory, "on_epoch_end", original)
    assert main(["prune", *TRAINING, "--method", "dais", "--epochs", "2", "--resume", "--out", str(tmp_path / "cut")]) == 0
    a, b = pk.load(tmp_path / "whole").state_dict(), pk.load(tmp_path / "cut").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["method_info"]["train"]["resumed_from_epoch"] == 1
    assert "every other batch" in report["method_info"]["indicator_data"]


def test_prune_with_ofa_writes_the_cohort(tmp_path) -> None:
    """`--method ofa`: the saved model is the cohort's target member at the data's resolution
    (its BN statistics re-estimated), and OUT/cohort loads by itself (the model spec is saved)
    and extracts that member with the same weights apart from the BN statistics."""
    from prunekit.methods.ofa import OFACohort

    out = tmp_path / "ofa"
    assert main(["prune", *TRAINING, "--method", "ofa", "--epochs", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    info = report["method_info"]
    assert "cohort" not in info and {m["name"] for m in info["members"]} >= {"flops0.5_16x16"}
    cohort = OFACohort.load(out / "cohort")
    assert cohort.members() == [{**m, "resolution": tuple(m["resolution"])} for m in info["members"]]
    saved, member = pk.load(out), cohort.extract(0.5).model
    a, b = saved.state_dict(), member.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "num_batches" not in k)
    assert 0.49 <= report["after"]["flops"] / report["before"]["flops"] <= 0.5
