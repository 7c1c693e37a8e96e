"""DAIS: annealing to binary indicators, the bi-level split, held-out batches that resume."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from prunekit import methods
from prunekit.methods._training import anneal
from prunekit.methods.dais import Alternate, HeldOut
from learned_nets import X, config, planted


def test_schedule_is_one_over_one_plus_49_e_over_e() -> None:
    """Hand values of ``1 / (1 + 49 e / E)`` (start 1, end 0.02)."""
    for e, want in [(0, 1.0), (0.25, 1 / 13.25), (0.5, 1 / 25.5), (1.0, 0.02), (2.0, 0.02)]:
        assert abs(anneal(1.0, 0.02, e) - want) < 1e-12


def test_temperature_towards_zero_gives_binary_indicators() -> None:
    model, data, held = planted()
    res = methods.get("dais")(model, X, loader=data, val_loader=held, epochs=6, train_config=config(6), ratio=0.5,
                              ignore=["4"], indicator_lr=0.1, init=0.1, end_temperature=1e-3)
    assert abs(res.info["final_temperature"] - 1e-3) < 1e-9
    assert res.info["binary_fraction"] == 1.0
    assert 0 < res.info["kept_above_half"] < res.info["indicators"]  # both values occur: real decisions
    # at T -> 0 each group's mean indicator is its fraction of indicators at 1
    assert all(v * 8 % 1 < 1e-6 or (1 - v * 8 % 1) < 1e-6 for v in [res.info["trajectory"][-1]["keep"]["0.0"]])


def test_indicators_learn_only_in_their_own_step() -> None:
    """With ``indicator_lr = 0`` the weights train (they change) but the indicators stay at
    their initial value: they are not in the weights' optimizer, although the weights' loss
    has gradients for them. The kept fraction per group is then sigmoid(init / T)."""
    model, data, held = planted()
    res = methods.get("dais")(model, X, loader=data, val_loader=held, epochs=2, train_config=config(2), ratio=0.3,
                              ignore=["4"], indicator_lr=0.0, init=0.5, end_temperature=0.5)
    keep = res.info["trajectory"][-1]["keep"]
    want = float(torch.sigmoid(torch.tensor(0.5 / 0.5)))
    assert all(abs(v - want) < 1e-6 for v in keep.values())
    moved = methods.get("dais")(model, X, loader=data, val_loader=held, epochs=2, train_config=config(2), ratio=0.3,
                                ignore=["4"], indicator_lr=0.1, init=0.5, end_temperature=0.5)
    assert any(abs(v - want) > 1e-3 for v in moved.info["trajectory"][-1]["keep"].values())
    assert res.info["indicator_data"].startswith("val_loader")


def test_alternate_splits_every_epoch_into_weight_and_indicator_batches() -> None:
    batches = list(range(7))
    alt = Alternate(batches)
    seen = []
    for b in alt:
        seen.append((b, alt.take()))
        assert alt.take() is None  # each held batch is handed out once
    assert seen == [(0, 1), (2, 3), (4, 5), (6, None)] and len(alt) == 4


def test_held_out_batches_continue_after_a_resume_of_a_shuffling_loader() -> None:
    """Eight batches from a shuffling DataLoader (three passes of three) against five, a
    fresh loader with the saved state, and three more."""
    def loader() -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(9)), batch_size=3, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    whole = HeldOut(loader())
    want = [whole.next()[0].tolist() for _ in range(8)]
    first = HeldOut(loader())
    got = [first.next()[0].tolist() for _ in range(5)]
    state = first.state_dict()
    again = HeldOut(loader())
    again.load_state_dict(state)
    got += [again.next()[0].tolist() for _ in range(3)]
    assert got == want
    assert sorted(sum(want[:3], [])) == list(range(9)) and want[:3] != want[3:6]  # passes are reshuffled
