"""Training methods under torch.distributed: two CPU processes (gloo), each with its own shard
of the planted task, must end with the same gates and weights, and those must differ from a
single process trained on rank 0's shard alone (so the ranks did exchange gradients)."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learned_nets import X, config, planted
from prunekit import methods
from prunekit.recover import shutdown_distributed

EPOCHS = 2
# (method, its options): strong enough to move the gates in a few steps on the tiny net.
CASES: list[tuple[str, dict[str, Any]]] = [("scp", {"budget_weight": 0.3}),
                                           ("dais", {"indicator_lr": 0.1, "init": 1.0}),
                                           ("colombo_gao", {})]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(rank: int, world: int) -> tuple[list, list]:
    """Rank ``rank``'s training and held-out batches of the planted task (every world-th)."""
    _, data, held = planted()
    return data[rank::world], held[rank % len(held)::world]


def _prune(name: str, options: dict[str, Any], data: list, held: list) -> methods.MethodResult:
    model = planted()[0]
    extra = {"val_loader": held} if name == "dais" else {}
    return methods.get(name)(model, X, loader=data, epochs=EPOCHS, train_config=config(EPOCHS), ratio=0.3,
                             min_channels=3, ignore=["4"], **options, **extra)


def _outcome(res: methods.MethodResult) -> dict[str, Any]:
    """What must agree across ranks: the pruned weights (the gates folded into them), the kept
    channels and the per-epoch gate trajectory."""
    return {"state": {k: v.clone() for k, v in res.model.state_dict().items()}, "keep": res.plan.keep,
            "trajectory": res.info["trajectory"]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ok = False
    try:
        data, held = _shard(rank, world)
        results = {name: _outcome(_prune(name, opts, data, held)) for name, opts in CASES}
        torch.save(results, Path(out) / f"rank{rank}.pt")
        ok = True
    finally:
        shutdown_distributed(synchronise=ok)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="this torch build has no torch.distributed gloo backend")
def test_training_methods_agree_across_two_gloo_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    # fork: the workers inherit the imported modules (a spawn would import torch twice more).
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    data, held = _shard(0, 2)
    for name, opts in CASES:
        a, b = r0[name], r1[name]
        assert a["keep"] == b["keep"], name
        assert a["trajectory"] == b["trajectory"], name
        assert a["state"].keys() == b["state"].keys()
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), f"{name}: ranks disagree on {k}"
        alone = _outcome(_prune(name, copy.deepcopy(opts), data, held))
        assert any(not torch.equal(v, a["state"][k]) for k, v in alone["state"].items()), \
            f"{name}: rank 1's shard had no effect"
