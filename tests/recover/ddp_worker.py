"""Worker for test_ddp.py: train a tiny MLP with prunekit.recover.train under torchrun (CPU, gloo).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py OUT_DIR``. Each rank
writes ``OUT_DIR/rank{r}.pt`` (final weights) and ``OUT_DIR/rank{r}.json`` (metrics); rank 0
also writes the run directory ``OUT_DIR/run``. The data, model and hyper-parameters are
module constants so that the test can rebuild the same problem for its single-process oracle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

N, BATCH_PER_RANK, EPOCHS, LR, SEED = 48, 6, 2, 0.2, 11


def make_data() -> TensorDataset:
    """48 points in 4-D with labels from a fixed linear rule (3 classes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    y = (x @ torch.tensor([[1.0, -1.0, 0.5], [0.5, 1.0, -1.0], [-1.0, 0.3, 1.0], [0.2, 0.2, 0.2]])).argmax(1)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    """A BN-free MLP, so that the data-parallel and single-process gradients are the same maths,
    with a channel gate on its hidden layer (``prunekit_gates``): DDP must train it like any
    parameter."""
    import prunekit as pk
    from prunekit.gates import attach_gates

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    attach_gates(model, pk.trace(model, torch.randn(2, 4)), kind="scale", init=0.5)
    return model


def main(out_dir: Path) -> None:
    """Train on this rank's shard and save weights and metrics."""
    from prunekit.recover import TrainConfig, init_distributed, is_main_process, shutdown_distributed, train
    from prunekit.zoo.data import make_loader

    rank, world, _ = init_distributed()
    model = make_model()
    if rank != 0:
        # A different start on the other ranks: DDP must broadcast rank 0's weights.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    ds = make_data()
    loader = make_loader(ds, batch_size=BATCH_PER_RANK, shuffle=True, seed=SEED, distributed=True)
    val = make_loader(ds, batch_size=16, shuffle=False, seed=0, distributed=True)
    cfg = TrainConfig(epochs=EPOCHS, lr=LR, optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant", seed=SEED)
    res = train(model, loader, cfg, val_loader=val, run_dir=out_dir / "run", progress=True)
    torch.save(model.state_dict(), out_dir / f"rank{rank}.pt")
    info = {"rank": rank, "world": world, "main": is_main_process(), "final": res.final}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(info))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
