"""Two-process DistributedDataParallel training on CPU/gloo matches single-process SGD."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

WORKER = Path(__file__).with_name("ddp_worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def _worker_module():
    spec = importlib.util.spec_from_file_location("prunekit_ddp_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _oracle(w) -> dict[str, torch.Tensor]:
    """Plain single-process SGD on the same global batches, written out by hand.

    DistributedSampler (shuffle, drop_last=False) permutes with a generator seeded by
    seed + epoch, and rank r takes every world-th index starting at r. Step b of the
    data-parallel run averages the gradients of the two ranks' b-th mini-batches.
    """
    ds = w.make_data()
    model = w.make_model()
    x_all, y_all = ds.tensors
    world = 2
    for epoch in range(w.EPOCHS):
        perm = torch.randperm(w.N, generator=torch.Generator().manual_seed(w.SEED + epoch)).tolist()
        shards = [perm[r::world] for r in range(world)]
        for b in range(0, len(shards[0]), w.BATCH_PER_RANK):
            losses = []
            for shard in shards:
                idx = torch.tensor(shard[b : b + w.BATCH_PER_RANK])
                losses.append(F.cross_entropy(model(x_all[idx]), y_all[idx]))
            loss = sum(losses) / world
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= w.LR * p.grad
    return model.state_dict()


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    for attempt in range(3):
        # The port is free when picked but another process on the machine can take it before
        # torchrun binds it; only that failure is retried, with a new port.
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        log = proc.stdout[-3000:] + proc.stderr[-3000:]
        if proc.returncode == 0 or "EADDRINUSE" not in log:
            break
    assert proc.returncode == 0, log

    w = _worker_module()
    s0 = torch.load(out / "rank0.pt", weights_only=True)
    s1 = torch.load(out / "rank1.pt", weights_only=True)
    assert any(".prunekit_gate_" in k for k in s0)  # the gate is trained under DDP too
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"ranks disagree on {k}"
    expected = _oracle(w)
    start = w.make_model().state_dict()
    for k in s0:
        torch.testing.assert_close(s0[k], expected[k], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(s0[k], start[k])  # it did train

    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2] and [i["main"] for i in info] == [True, False]
    assert info[0]["final"]["train_images"] == w.N  # all-reduced: both shards counted
    for key in ("train_loss", "train_acc", "val_loss", "val_top1"):
        assert info[0]["final"][key] == pytest.approx(info[1]["final"][key], rel=1e-6), key
    # Only rank 0 writes: one log line per epoch (two writers would give four).
    lines = (out / "run" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    ckpt = torch.load(out / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    for k in s0:
        assert torch.equal(ckpt["model"][k], s0[k])
