"""`prunekit prune` on an ``hf:`` model, and the warning line of a prune that does less than asked."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit as pk
from prunekit.cli.main import main


def test_prune_of_a_model_without_prunable_channels_prints_a_warning_line(tmp_path, capsys) -> None:
    """Every channel of a lone conv reaches the output: nothing can go, and the shell says so
    in one line (and plan.meta records it), instead of a silent success."""
    (tmp_path / "net.py").write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 1))\n")
    out = tmp_path / "o"
    rc = main(["prune", "--model", f"{tmp_path / 'net.py'}:build", "--ratio", "0.5", "--input-shape", "1,3,8,8",
               "--out", str(out), "--no-latency"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "prunekit prune: warning: removed 0 of 4 channels at ratio=0.5" in err
    assert "no channel of the model is prunable" in err
    assert "shortfall" in json.loads((out / "report.json").read_text())["plan"]


def test_prune_an_hf_model_by_name_keeps_its_head_and_reloads(tmp_path, capsys) -> None:
    pytest.importorskip("transformers", reason="transformers (the 'hf' extra) is not installed")
    out = tmp_path / "gpt2"
    assert main(["prune", "--model", "hf:gpt2", "--ratio", "0.5", "--out", str(out), "--no-latency"]) == 0
    assert "warning" not in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["input_shape"] == [1, 16] and report["after"]["params"] < 0.5 * report["before"]["params"]
    small = pk.load(out).eval()
    assert small.lm_head.out_features == 1000 and small.lm_head.weight is small.transformer.wte.weight
    with torch.no_grad():
        assert small(input_ids=torch.zeros(1, 16, dtype=torch.long)).logits.shape == (1, 16, 1000)
