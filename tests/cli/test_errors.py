"""Bad input exits with status 2 and one line on stderr naming the culprit; --help documents every option."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from prunekit.cli.main import build_parser, main

COMMANDS = ("demo", "train", "finetune", "eval", "export", "prune")


def _fail(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prunekit {argv[0]}: error: "), err
    return lines[0]


def test_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, "train", "--model", "resnet57", "--data", "digits", "--out", str(tmp_path / "o"))
    assert "resnet57" in err and "resnet56" in err  # names the culprit and suggests the close match
    assert not (tmp_path / "o").exists()  # nothing is created before the input is checked


def test_missing_data_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-cifar-here"
    err = _fail(capsys, "train", "--model", "resnet20", "--data", f"cifar10:{missing}", "--out", str(tmp_path / "o"))
    assert "--data" in err and str(missing) in err


def test_placeholder_data_path_of_a_packaged_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, "train", "--recipe", "resnet20_cifar10", "--out", str(tmp_path / "o"))
    assert "placeholder" in err and "--data cifar10:" in err


def test_bad_recipe_key_names_key_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model: small_cnn\nepocs: 3\n")
    err = _fail(capsys, "train", "--recipe", str(recipe), "--data", "digits", "--out", str(tmp_path / "o"))
    assert "'epocs'" in err and str(recipe) in err and "epochs" in err


@pytest.mark.parametrize("argv", [["demo", "--target-flops", "1.5"],
                                  ["prune", "--model", "small_cnn", "--target-flops", "1.5"],
                                  ["prune", "--model", "small_cnn", "--target-flops", "0"]])
def test_impossible_target_is_rejected_before_any_work(argv: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, *argv, "--out", str(tmp_path / "o"))
    assert "--target-flops" in err and argv[-1] in err


def test_bad_per_module_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, "prune", "--model", "resnet20", "--ratios", "layer3=1.2", "--out", str(tmp_path / "o"))
    assert "--ratios layer3=1.2" in err
    err = _fail(capsys, "prune", "--model", "resnet20", "--ratios", "layer3", "--out", str(tmp_path / "o"))
    assert "MODULE=RATIO" in err


def test_bad_value_in_recipe_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target_flops: 1.5\n")
    err = _fail(capsys, "prune", "--model", "small_cnn", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert "target_flops" in err and str(recipe) in err


def test_existing_files_in_out_survive_failures_and_successes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fail(capsys, "prune", "--model", "nope_net", "--out", str(out))
    rc = main(["prune", "--model", "small_cnn", "--in-chans", "1", "--input-shape", "1,1,16,16", "--ratio", "0.3",
               "--out", str(out), "--no-latency"])
    assert rc == 0
    assert (out / "keep.txt").read_text() == "precious" and (out / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind


def test_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    err = _fail(capsys, "train", "--model", "small_cnn", "--data", "digits", "--out", str(f))
    assert "--out" in err and f.read_text() == "x"


def test_not_a_saved_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, "eval", "--model", str(tmp_path), "--data", "digits")
    assert "plan.json" in err
    err = _fail(capsys, "finetune", "--pruned", str(tmp_path / "nope"), "--data", "digits", "--out", str(tmp_path / "o"))
    assert "--pruned" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    p = sub.choices[command]
    for action in p._actions:  # noqa: SLF001
        assert action.help and len(action.help) > 10, f"{command} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(opt in text for a in p._actions for opt in a.option_strings)  # noqa: SLF001
