"""What the commands print besides results: no stray torch notice, the loss on progress bars,
singular "1 thread", a report title naming the data set."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit.recover import TrainConfig, train
from prunekit.report import markdown


def test_the_benchmark_import_logs_no_cuda_notice() -> None:
    # A fresh process: the import that logs it happens once. On a machine with a CUDA toolkit
    # but no CUDA runtime (CPU CI with CUDA_HOME) the notice appeared without the filter.
    code = "from prunekit.measure.latency import _import_benchmark; _import_benchmark(); print('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr
    assert "No CUDA runtime is found" not in done.stderr


def test_progress_bar_shows_the_loss_in_epochs_shorter_than_log_every(capsys: pytest.CaptureFixture[str]) -> None:
    data = TensorDataset(torch.randn(12, 4), torch.arange(12) % 2)
    model = nn.Linear(4, 2)
    cfg = TrainConfig(epochs=1, lr=0.1, batch_size=4, log_every=50)  # 3 steps: the log step never comes
    train(model, DataLoader(data, batch_size=4), cfg, progress=True)
    assert "loss=" in capsys.readouterr().err


def test_one_thread_is_singular_and_the_report_title_names_the_data() -> None:
    prof = pk.profile(nn.Linear(4, 2), torch.randn(1, 4), threads=1)
    assert "1 thread," in str(prof)
    md = markdown({"command": "train", "model": "small_cnn", "data": "digits", "environment": {"cpu_threads": 1}})
    assert md.startswith("# prunekit train: small_cnn on digits\n") and ", 1 thread." in md
