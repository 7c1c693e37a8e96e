"""The bad-input table: every command below exits 2 with exactly one line on stderr naming the
flag, file or module at fault, and leaves a run directory made beforehand byte-identical
(even where the command points ``--out`` at it). Complements test_errors.py (recipe and
option checks) with damaged files, impossible requests and mismatched data."""

from __future__ import annotations

import collections
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.cli.main import main


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(run, bad)``: a pruned 1-channel small_cnn run (fast: no data, no latency) and a
    folder of damaged copies and files built from it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run, bad = root / "run", root / "bad"
    assert main(["prune", "--model", "small_cnn", "--in-chans", "1", "--input-shape", "1,1,16,16", "--ratio", "0.3",
                 "--out", str(run), "--no-latency"]) == 0
    bad.mkdir()
    arrays = {"x_train": np.zeros((20, 3, 8, 8), np.float32), "y_train": np.arange(20) % 2,
              "x_test": np.zeros((10, 3, 8, 8), np.float32), "y_test": np.arange(10) % 2}
    np.savez(bad / "rgb.npz", **arrays)
    raw = (bad / "rgb.npz").read_bytes()
    (bad / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    (bad / "garbage.npz").write_bytes(b"not an archive at all")
    for name in ("badweights", "badplan", "misfit"):
        shutil.copytree(run, bad / name)
    (bad / "badweights" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    plan = (run / "plan.json").read_text()
    (bad / "badplan" / "plan.json").write_text(plan[: len(plan) // 3])
    meta = json.loads(plan)
    meta["meta"].update(in_chans=3, input_shape=[1, 3, 16, 16])  # the weights and steps are for 1 channel
    (bad / "misfit" / "plan.json").write_text(json.dumps(meta))
    torch.save({"epoch": 1, "w": torch.ones(3)}, bad / "ok.pt")
    for name, data in (("truncck", (bad / "ok.pt").read_bytes()[:40]),
                       ("pickleck", pickle.dumps(collections.Counter("ab")))):
        (bad / name).mkdir()
        (bad / name / "checkpoint.pt").write_bytes(data)
    (bad / "afile").write_text("a regular file")
    return run, bad


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


UNWRITABLE = "/proc/prunekit-test/m.onnx"  # /proc takes no new files, even for root
P = pytest.param  # P(command with {run}/{bad}, substring of the one stderr line, id=...)

CASES = [
    # 4: an impossible budget
    P("prune --model small_cnn --input-shape 1,3,16,16 --target-flops 0.001 --out {run} --no-latency",
      "target_flops=0.001 cannot be met; the smallest model keeps 0.12% of the FLOPs", id="budget"),
    # 5: --resume without a checkpoint
    P("finetune --pruned {run} --data digits --out {run} --resume", "--resume: no checkpoint.pt in {run}",
      id="finetune-resume"),
    P("train --model small_cnn --data digits --out {run} --resume", "--resume: no checkpoint.pt in {run}",
      id="train-resume"),
    # 6: damaged files
    P("eval --model {run} --data npz:{bad}/garbage.npz --no-latency", "{bad}/garbage.npz: not a readable .npz archive",
      id="garbage-npz"),
    P("eval --model {run} --data npz:{bad}/trunc.npz --no-latency", "{bad}/trunc.npz: not a readable .npz archive",
      id="truncated-npz"),
    P("profile --model {bad}/badweights --no-latency", "{bad}/badweights/model.safetensors: not a readable safetensors",
      id="corrupt-safetensors"),
    P("profile --model {bad}/badplan --no-latency", "{bad}/badplan/plan.json: not a readable prunekit plan",
      id="truncated-plan"),
    P("profile --model {bad}/misfit --no-latency", "plan does not fit the model: 'stem_conv.weight'", id="plan-misfit"),
    P("finetune --pruned {run} --data digits --out {bad}/truncck --resume",
      "--resume: {bad}/truncck/checkpoint.pt: truncated or corrupt", id="truncated-checkpoint"),
    P("finetune --pruned {run} --data digits --out {bad}/pickleck --resume",
      "{bad}/pickleck/checkpoint.pt: holds objects other than tensors, which are refused", id="pickle-checkpoint"),
    P("eval --model small_cnn --in-chans 1 --weights {bad}/pickleck/checkpoint.pt --data digits --no-latency",
      "{bad}/pickleck/checkpoint.pt: holds objects other than tensors", id="pickle-weights"),
    P("eval --model small_cnn --in-chans 1 --weights {bad}/badweights/model.safetensors --data digits --no-latency",
      "model.safetensors': not a readable safetensors file", id="corrupt-weights"),
    # 7: export destinations and options, counts, methods, argparse, data that does not fit the model
    P("export --model {run} --out " + UNWRITABLE, f"--out {UNWRITABLE}: cannot create files", id="export-unwritable",
      marks=pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")),
    P("export --model {run} --out {bad}/afile/m.onnx", "{bad}/afile is a file, not a directory", id="export-below-file"),
    P("export --model {run} --out {run}", "--out {run}: is a directory", id="export-onto-dir"),
    P("export --model {run} --out {bad}/m.onnx --opset 1", "--opset 1: this torch exports opsets", id="export-opset"),
    P("profile --model {run} --threads 0", "argument --threads: must be >= 1, got 0", id="threads"),
    P("train --model small_cnn --data digits --num-classes 0 --out {run}", "--num-classes 0: must be >= 1",
      id="num-classes"),
    P("train --model small_cnn --data digits --in-chans 0 --out {run}", "--in-chans 0: must be >= 1", id="in-chans"),
    P("train --model small_cnn --data digits --image-size 0 --out {run}", "--image-size 0: must be >= 1",
      id="image-size"),
    P("prune --model small_cnn --method nope --out {run} --no-latency",
      "--method nope: unknown method 'nope'; available: autopruner, block_drop, cacp, cap", id="unknown-method"),
    P("prune --model small_cnn --ratio abc --out {run}", "argument --ratio: invalid float value: 'abc'",
      id="argparse-type"),
    P("finetune --pruned {run} --data npz:{bad}/rgb.npz --out {run}",
      "--data npz:{bad}/rgb.npz: 3-channel images, but the model takes in_chans=1 (saved in --pruned {run})",
      id="data-channels-run"),
    P("train --model small_cnn --data digits --in-chans 3 --out {run}",
      "--data digits: 1-channel images, but the model takes in_chans=3 (from --in-chans)", id="data-channels-flag"),
]


@pytest.mark.parametrize(("command", "expected"), CASES)
def test_bad_input_is_one_line_and_touches_nothing(command: str, expected: str, dirs: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run, bad = dirs
    before = _digest(run)
    argv = command.format(run=run, bad=bad).split()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's errors exit from inside parse_args
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prunekit {argv[0]}: error: "), err
    assert expected.format(run=run, bad=bad) in lines[0], lines[0]
    assert _digest(run) == before


def test_profile_of_a_one_channel_run_uses_its_saved_input_shape(dirs: tuple[Path, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = dirs  # what `prunekit demo` and `prune --in-chans 1` write: the natural next command must work
    assert main(["profile", "--model", str(run), "--no-latency", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] > 0
