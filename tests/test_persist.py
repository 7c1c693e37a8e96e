"""Save/load without pickled code: safetensors + plan re-applied to a fresh architecture."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import prunekit as pk
from nets import TinyViT, randomize_bn
from prunekit.errors import PruningError
from prunekit.plan import PruningPlan


def test_round_trip_with_fresh_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    small, plan = pk.prune(model, x, ratio=0.4, return_plan=True)
    pk.save(small, plan, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.safetensors", "plan.json"]
    loaded = pk.load(tmp_path / "run", lambda: torchvision.models.resnet18(num_classes=10)).eval()
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    assert "pickle" not in (tmp_path / "run" / "plan.json").read_text()


def test_round_trip_by_model_spec_and_attribute_fixes(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    small, plan = pk.prune(model, x, ratio=0.5, return_plan=True)
    assert any(a.attr == "num_heads" for a in plan.attrs)
    pk.save(small, plan, tmp_path)
    loaded = pk.load(tmp_path, TinyViT).eval()
    assert loaded.attn.num_heads == small.attn.num_heads == 2
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_zoo_spec_is_enough(tmp_path) -> None:
    from prunekit.zoo import resolve_model

    model = resolve_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    small, plan = pk.prune(model, x, ratio=0.5, return_plan=True)
    pk.save(small, plan, tmp_path, model_spec="resnet20")
    torch.testing.assert_close(pk.load(tmp_path).eval()(x), small(x))


def test_plan_json_round_trips() -> None:
    model = TinyViT()
    _, plan = pk.prune(model, torch.randn(1, 3, 16, 16), ratio=0.5, return_plan=True)
    again = PruningPlan.from_json(plan.to_json())
    assert again == plan
    with pytest.raises(ValueError, match="not a prunekit plan"):
        PruningPlan.from_dict({"format": "other"})


def test_plan_on_wrong_architecture_fails_before_changing_it(tmp_path) -> None:
    model = torchvision.models.resnet18(num_classes=10)
    small, plan = pk.prune(model, torch.randn(1, 3, 32, 32), ratio=0.5, return_plan=True)
    pk.save(small, plan, tmp_path)
    wrong = torchvision.models.resnet18(num_classes=10)
    wrong.conv1 = torch.nn.Conv2d(3, 32, 7, 2, 3, bias=False)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(PruningError, match="conv1.weight"):
        pk.load(tmp_path, wrong)
    assert all(torch.equal(v, before[k]) for k, v in wrong.state_dict().items())


def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    model = TinyViT()
    small, plan = pk.prune(model, torch.randn(1, 3, 16, 16), ratio=0.5, return_plan=True)
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    pk.save(small, plan, run)
    old = {p.name: p.read_bytes() for p in run.iterdir()}
    import prunekit.runtime as runtime

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(runtime.os, "fsync", boom)
    other, plan2 = pk.prune(TinyViT(), torch.randn(1, 3, 16, 16), ratio=0.25, return_plan=True)
    with pytest.raises(OSError, match="disk full"):
        pk.save(other, plan2, run)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == old  # the whole run untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary directory left
    monkeypatch.undo()
    pk.save(other, plan2, run)
    assert (run / "notes.txt").read_text() == "mine"
    assert pk.persist.load_plan(run) == plan2 and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads(old["plan.json"])["format"] == "prunekit.plan/2"
