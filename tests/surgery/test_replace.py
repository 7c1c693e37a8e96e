"""Plan v2 steps: Replace / Drop / SetAttr surgery, all-or-nothing, save/load, compose."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import prunekit as pk
from prunekit.errors import PruningError
from prunekit.plan import Drop, PruningPlan, Replace, SetAttr, Slice, compose
from prunekit.surgery import apply_plan
from prunekit.surgery.replace import check_structure, replace_step


def svd_pair(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """k x k conv C->r then 1x1 conv r->N from numpy's SVD of the N x (C k k) weight."""
    w = conv.weight.detach().double().numpy()
    n = w.shape[0]
    u, s, vt = np.linalg.svd(w.reshape(n, -1), full_matrices=False)
    first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding, bias=False)
    second = nn.Conv2d(rank, n, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy((np.sqrt(s[:rank])[:, None] * vt[:rank]).reshape(rank, *w.shape[1:])))
        second.weight.copy_(torch.from_numpy((u[:, :rank] * np.sqrt(s[:rank])).reshape(n, rank, 1, 1)))
        if conv.bias is not None:
            second.bias.copy_(conv.bias)
    return nn.Sequential(first, second)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.branch(x))


def test_full_rank_factorisation_computes_the_original() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    conv = model.branch[0]
    full = conv.in_channels * 9 if conv.in_channels * 9 < conv.out_channels else conv.out_channels
    plan = PruningPlan((replace_step("branch.0", svd_pair(conv, full)),))
    new = apply_plan(model, plan)
    assert isinstance(new.branch[0], nn.Sequential) and isinstance(model.branch[0], nn.Conv2d)
    torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)
    low = apply_plan(model, PruningPlan((replace_step("branch.0", svd_pair(conv, 2)),)))
    assert not torch.allclose(low(x), model(x), atol=1e-3)  # the oracle can fail: rank 2 is not exact
    assert check_structure(model, new, x, plan) is None


def test_dropping_a_zero_branch_computes_the_original() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        model.branch[2].weight.zero_()
        model.branch[2].bias.zero_()
    x = torch.randn(2, 3, 8, 8)
    dropped = apply_plan(model, PruningPlan((Drop("branch", "zero"),)))
    torch.testing.assert_close(dropped(x), model(x), rtol=0, atol=0)
    assert sum(p.numel() for p in dropped.parameters()) < sum(p.numel() for p in model.parameters())


def test_dropping_a_resnet_block_whose_branch_is_zero() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(apply_plan(model, PruningPlan((Drop("layer1.1"),)))(x), model(x))
    with torch.no_grad():  # the branch ends in bn2: zero gamma and beta make its output zero
        model.layer1[1].bn2.weight.zero_()
        model.layer1[1].bn2.bias.zero_()
    dropped = apply_plan(model, PruningPlan((Drop("layer1.1"),)))
    assert isinstance(dropped.layer1[1], nn.Identity)
    torch.testing.assert_close(dropped(x), model(x), rtol=0, atol=0)  # relu(x + 0) = x after a relu


def test_remove_from_sequential_keeps_other_names() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Identity(), nn.Linear(4, 2))
    out = apply_plan(model, PruningPlan((Drop("2", "remove"),)))
    assert list(out._modules) == ["0", "1", "3"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(out(x), model(x))
    with pytest.raises(PruningError, match="not an nn.Sequential"):
        apply_plan(Residual(), PruningPlan((Drop("stem", "remove"),)))


def test_in_place_failure_rolls_every_step_back() -> None:
    torch.manual_seed(0)
    model = Residual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    _, channel = pk.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, return_plan=True)
    bad = PruningPlan(channel.steps + (Replace("branch.0", "identity", {}), Drop("nope")))
    with pytest.raises(PruningError, match="no child 'nope'"):
        apply_plan(model, bad, inplace=True)
    assert dict(model.named_modules()) == modules  # same module objects, same names
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.stem.out_channels == 8


def test_unknown_factory_and_bad_tensors_are_clear_errors() -> None:
    model = Residual()
    with pytest.raises(PruningError, match="unknown module factory 'warp'"):
        apply_plan(model, PruningPlan((Replace("stem", "warp", {}),)))
    step = Replace("stem", "linear", {"in_features": 3, "out_features": 2}, state={"weight": torch.zeros(5, 5)})
    with pytest.raises(PruningError, match="do not fit factory 'linear'"):
        apply_plan(model, PruningPlan((step,)))


def test_set_attr_step_and_missing_module() -> None:
    model = Residual()
    out = apply_plan(model, PruningPlan((SetAttr("head.0", "start_dim", 1),)))
    assert out.head[0].start_dim == 1
    with pytest.raises(PruningError, match="module 'ghost'"):
        apply_plan(model, PruningPlan((SetAttr("ghost", "x", 1),)))


def _mixed_plan(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, PruningPlan]:
    small, channel = pk.prune(model, x, ratio=0.5, return_plan=True, ignore=["stem"])
    conv = small.branch[0]
    structural = PruningPlan((replace_step("branch.0", svd_pair(conv, 3)), Drop("branch.1", "identity")))
    return apply_plan(small, structural), compose(channel, structural)


def test_save_load_round_trips_every_step_kind(tmp_path) -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    final, plan = _mixed_plan(model, x)
    plan = PruningPlan(plan.steps + (SetAttr("head.0", "end_dim", -1),), plan.meta)
    kinds = {type(s).__name__ for s in plan.steps}
    assert kinds == {"Slice", "Replace", "Drop", "SetAttr"}
    pk.save(final, plan, tmp_path / "run")
    text = (tmp_path / "run" / "plan.json").read_text()
    assert json.loads(text)["format"] == "prunekit.plan/2" and "pickle" not in text
    loaded = pk.load(tmp_path / "run", Residual).eval()
    torch.testing.assert_close(loaded(x), final.eval()(x), rtol=0, atol=0)
    assert PruningPlan.from_json(text) == plan


def test_compose_across_kinds_equals_sequential_application() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    final, plan = _mixed_plan(model, x)
    once = apply_plan(model, plan).eval()
    torch.testing.assert_close(once(x), final.eval()(x), rtol=0, atol=0)
    # Two channel rounds compose into a single slice step.
    s1, p1 = pk.prune(model, x, ratio=0.25, return_plan=True)
    s2, p2 = pk.prune(s1, x, ratio=0.25, return_plan=True)
    both = compose(p1, p2)
    assert sum(isinstance(s, Slice) for s in both.steps) == 1
    torch.testing.assert_close(apply_plan(model, both).eval()(x), s2.eval()(x), rtol=0, atol=0)


def test_plan_v1_still_loads() -> None:
    v1 = {"format": "prunekit.plan/1", "keep": {"stem.weight": {"0": [0, 2]}}, "shapes": {"stem.weight": [8, 3, 3, 3]},
          "attrs": [["head", "dim", [2, 3]]], "meta": {"ratio": 0.5}}
    plan = PruningPlan.from_dict(v1)
    assert plan.keep == {"stem.weight": {0: [0, 2]}} and plan.attrs == (SetAttr("head", "dim", (2, 3)),)
    assert plan.meta == {"ratio": 0.5}
    with pytest.raises(ValueError, match="unknown kind 'melt'"):
        PruningPlan.from_dict({"format": "prunekit.plan/2", "steps": [{"kind": "melt"}]})


def test_check_structure_reports_a_changed_output() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    wrong = apply_plan(model, PruningPlan((Replace("2", "linear", {"in_features": 6, "out_features": 3}),)))
    msg = check_structure(model, wrong, torch.randn(2, 4))
    assert msg is not None and "output 0 is (2, 3)" in msg


def test_check_structure_skips_replaced_modules_that_later_steps_change() -> None:
    """A Replace whose module a later step drops, or whose tensors a later slice shrinks, is
    not compared with its factory (its tensors are no longer the factory's); one no later
    step touches still is."""
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    replace = replace_step("branch.0", svd_pair(model.branch[0], 3))
    dropped_plan = PruningPlan((replace, Drop("branch.0", "identity")))
    assert check_structure(model, apply_plan(model, dropped_plan), x, dropped_plan) is None
    factorised = apply_plan(model, PruningPlan((replace,)))
    small, channel = pk.prune(factorised, x, ratio=0.5, return_plan=True, ignore=["stem"])
    sliced_plan = compose(PruningPlan((replace,)), channel)
    assert any(name.startswith("branch.0.") for name in channel.keep)  # the slice reaches the replaced pair
    assert check_structure(model, small, x, sliced_plan) is None
    # Untouched by later steps, a Replace whose module is not what its factory builds is reported.
    wrong = PruningPlan((Replace("branch.0", "conv", {"dims": 2, "in_channels": 8, "out_channels": 8,
                                                      "kernel_size": [1, 1]}), Drop("branch.1", "identity")))
    msg = check_structure(model, apply_plan(model, dropped_plan), x, wrong)
    assert msg is not None and "Replace 'branch.0'" in msg


class _Attend(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))


def test_a_replace_that_keeps_tensors_leaves_later_slices_in_the_channel_part() -> None:
    """Two rounds: the first replaces the attention (heads and embedding pruned apart), the
    second slices the replacement. The composed plan's keep chains both slices; its JSON form
    (no tensors in it) applied to the original takes the original's tensors over and gives the
    twice-pruned model exactly."""
    torch.manual_seed(0)
    model, x = _Attend().eval(), torch.randn(2, 5, 6)
    once, p1 = pk.prune(model, x, ratio=0.0, group_ratios={"attn": 0.5}, return_plan=True)
    twice, p2 = pk.prune(once, x, ratio=0.0, group_ratios={"embed (+1 coupled)": 0.5}, return_plan=True)
    (rep,) = [s for s in p1.steps if isinstance(s, Replace)]
    assert rep.keeps_tensors and rep.factory == "multihead_attention"
    plan = compose(p1, p2)
    kept_rows = plan.keep["attn.in_proj_weight"]
    assert len(kept_rows[0]) == 3 * 8 and len(kept_rows[1]) == 8  # heads from round 1, embedding from round 2
    rebuilt = apply_plan(model, PruningPlan.from_json(plan.to_json()))
    assert type(rebuilt.attn).__name__ == "PrunedMultiheadAttention"
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), twice(x), rtol=0, atol=0)
