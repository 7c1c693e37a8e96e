"""End-to-end tests of the pipeline commands (demo, train --resume, finetune, eval, prune --recipe), in-process."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prunekit as pk
from prunekit.cli.main import main
from prunekit.recipe import load_recipe
from prunekit.recover import evaluate
from prunekit.zoo import load_dataset, make_loader


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _top1(model: torch.nn.Module, batch_size: int) -> float:
    test = load_dataset("digits", split="test", augment=False)
    return evaluate(model.eval(), make_loader(test, batch_size=batch_size, shuffle=False, seed=0))["top1"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One reduced demo run shared by the tests below (a file placed in --out beforehand must survive)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    buf = io.StringIO()  # capsys is function-scoped: capture stdout by hand
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--out", str(out), "--epochs", "2", "--finetune-epochs", "1", "--no-progress"])
    assert rc == 0
    return out, buf.getvalue()


def test_demo_writes_model_report_recipe_and_plot(demo_dir: tuple[Path, str]) -> None:
    out, stdout = demo_dir
    for name in ("model.safetensors", "plan.json", "recipe.yaml", "report.json", "report.md", "accuracy_vs_flops.png",
                 "baseline/model.safetensors", "baseline/plan.json", "baseline/checkpoint.pt", "finetune/checkpoint.pt"):
        assert (out / name).is_file(), name
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"], report["after"]
    for part in (before, after):
        assert part["params"] > 0 and part["flops"] > 0 and part["latency"]["median_ms"] > 0
        assert 0.0 <= part["top1"] <= 1.0 and "top5" in part and "loss" in part
    assert 0.4 <= after["flops"] / before["flops"] <= 0.6
    assert after["params"] < before["params"]
    assert report["plan"]["groups_pruned"] > 0 and report["plan"]["target_flops"] == 0.5
    assert "top1" in report["pruned"] and report["finetune"]["epochs"] == 1 and report["train"]["epochs"] == 2
    md = (out / "report.md").read_text()
    assert "| top1 |" in md and "| FLOPs |" in md and "accuracy_vs_flops.png" in md
    assert "after/before" in stdout and "pruned" in stdout and str(out) in stdout and "groups" in stdout


def test_demo_model_loads_alone_with_the_reported_accuracy(demo_dir: tuple[Path, str]) -> None:
    out, _ = demo_dir
    report = json.loads((out / "report.json").read_text())
    model = pk.load(out)
    assert _top1(model, report["recipe"]["eval_batch_size"]) == report["after"]["top1"]
    assert sum(p.numel() for p in model.parameters()) == report["after"]["params"]
    baseline = pk.load(out / "baseline")
    assert _top1(baseline, report["recipe"]["eval_batch_size"]) == report["before"]["top1"]


def test_demo_recipe_is_resolved_and_reloadable(demo_dir: tuple[Path, str]) -> None:
    out, _ = demo_dir
    saved = load_recipe(out / "recipe.yaml")
    packaged = load_recipe("digits_demo")
    assert saved["epochs"] == 2 and saved["finetune_epochs"] == 1  # flags win
    for key, value in packaged.items():  # everything else comes from digits_demo.yaml
        if key not in ("epochs", "finetune_epochs"):
            assert saved[key] == value, key
    assert json.loads((out / "report.json").read_text())["recipe"] == saved


def test_eval_prints_json_matching_the_report(demo_dir: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = demo_dir
    report = json.loads((out / "report.json").read_text())
    rc, stdout, _ = _run(capsys, "eval", "--model", str(out), "--data", "digits", "--eval-batch-size", "360",
                         "--latency-batch", "8")
    assert rc == 0
    result = json.loads(stdout)
    assert result["top1"] == report["after"]["top1"] and result["flops"] == report["after"]["flops"]
    assert result["input_shape"] == [1, 1, 16, 16]
    assert result["latency_batch1"]["median_ms"] > 0 and result["latency_batch8"]["images_per_s"] > 0


def test_finetune_keeps_the_plan_and_reports_before_after(demo_dir: tuple[Path, str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = demo_dir
    ft = tmp_path / "ft"
    rc, stdout, _ = _run(capsys, "finetune", "--pruned", str(out), "--data", "digits", "--teacher", str(out / "baseline"),
                         "--epochs", "1", "--subset", "100", "--optimizer", "adamw", "--lr", "1e-4", "--out", str(ft),
                         "--no-latency", "--no-progress")
    assert rc == 0, stdout
    report = json.loads((ft / "report.json").read_text())
    assert report["before"]["top1"] == json.loads((out / "report.json").read_text())["after"]["top1"]
    assert "top1" in report["after"] and report["teacher"] == str(out / "baseline")
    assert json.loads((ft / "plan.json").read_text())["steps"] == json.loads((out / "plan.json").read_text())["steps"]
    assert _top1(pk.load(ft), 360) == report["after"]["top1"]


def test_prune_a_trained_directory_then_load_it(demo_dir: tuple[Path, str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = demo_dir
    rc, stdout, err = _run(capsys, "prune", "--model", str(out / "baseline"), "--ratio", "0.25", "--out",
                           str(tmp_path / "p"), "--no-latency")
    assert rc == 0, err
    pruned = pk.load(tmp_path / "p")
    assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["meta"]["ratio"] == 0.25
    rc, _, err = _run(capsys, "prune", "--model", str(out), "--out", str(tmp_path / "q"), "--no-latency")
    assert rc == 2 and "already pruned" in err


def test_prune_from_recipe_with_flag_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: small_cnn\nin_chans: 1\ninput_shape: 1,1,16,16\nratio: 0.25\ncriterion: l1\n")
    rc, _, err = _run(capsys, "prune", "--recipe", str(recipe), "--out", str(tmp_path / "a"), "--no-latency")
    assert rc == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["plan"]["criterion"] == "l1" and report["plan"]["ratio"] == 0.25
    assert report["input_shape"] == [1, 1, 16, 16]
    rc, _, err = _run(capsys, "prune", "--recipe", str(recipe), "--criterion", "l2", "--target-flops", "0.5",
                      "--out", str(tmp_path / "b"), "--no-latency")
    assert rc == 0, err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["plan"]["criterion"] == "l2" and 0.4 <= report["after"]["flops"] / report["before"]["flops"] <= 0.6
    saved = load_recipe(tmp_path / "b" / "recipe.yaml")
    assert (saved["criterion"], saved["target_flops"], saved["model"]) == ("l2", 0.5, "small_cnn")
    assert pk.load(tmp_path / "b")(torch.randn(1, 1, 16, 16)).shape == (1, 10)


def test_train_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    train_mod = importlib.import_module("prunekit.recover.train")  # the package re-exports a function of that name

    common = ["--model", "small_cnn", "--data", "digits", "--subset", "100", "--batch-size", "25", "--epochs", "2",
              "--optimizer", "adamw", "--lr", "3e-3", "--no-latency", "--no-progress"]
    rc, _, err = _run(capsys, "train", *common, "--out", str(tmp_path / "straight"))
    assert rc == 0, err

    real = train_mod._train_one_epoch

    def dies_in_epoch_2(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if kwargs["epoch"] == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_one_epoch", dies_in_epoch_2)
    rc, _, err = _run(capsys, "train", *common, "--out", str(tmp_path / "resumed"))
    assert rc == 130 and "interrupted" in err
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file() and not (tmp_path / "resumed" / "model.safetensors").exists()
    monkeypatch.setattr(train_mod, "_train_one_epoch", real)
    rc, _, err = _run(capsys, "train", *common, "--out", str(tmp_path / "resumed"), "--resume")
    assert rc == 0, err

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert report["train"]["resumed_from_epoch"] == 1 and len(report["train"]["history"]) == 2
    straight = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert report["after"]["top1"] == straight["after"]["top1"]
    assert pk.load(tmp_path / "resumed")(torch.randn(1, 1, 16, 16)).shape == (1, 10)
