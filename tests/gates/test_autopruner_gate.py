"""The ``autopruner`` gate kind: identity while waiting, the removed channels' function once
frozen, the running code in eval, one code per coupled group computed at its first site."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import prunekit as pk
from nets import Residual, cbr, randomize_bn
from prunekit.gates import attach_gates
from prunekit.gates.autopruner import ACTIVE, WAITING, AutoPrunerGate

X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(cbr(3, 8), cbr(8, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(6, 4))).eval()


def _outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The outputs on X in eval and in train mode, each from a copy (a training pass moves the
    BN statistics)."""
    with torch.no_grad():
        return {m: copy.deepcopy(model).train(m == "train")(X) for m in ("eval", "train")}


def test_a_waiting_gate_computes_the_original_and_a_frozen_one_the_pruned_function() -> None:
    """Waiting: exactly the original in both modes. Frozen to code c: the original with the BN
    affine parameters of the code-0 channels zeroed (those channels removed), in both modes."""
    net = _net()
    gated, oracle = copy.deepcopy(net), copy.deepcopy(net)
    want = _outputs(net)
    gates = attach_gates(gated, pk.trace(gated.eval(), X[:1], ignore=["4"]), kind="autopruner", state=WAITING)
    got = _outputs(gated)
    for mode in ("eval", "train"):
        assert torch.equal(got[mode], want[mode])
    code = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 0])
    gate = next(iter(gates.gates.values()))
    assert gate.size == 8
    gate.freeze(code)
    with torch.no_grad():
        oracle[0][1].weight.mul_(code)
        oracle[0][1].bias.mul_(code)
    got, want = _outputs(gated), _outputs(oracle)
    for mode in ("eval", "train"):
        torch.testing.assert_close(got[mode], want[mode])
    assert not torch.allclose(want["eval"], _outputs(net)["eval"])  # the zeroed channels mattered
    imp = gate.importance()
    assert imp[code == 0].max() < imp[code == 1].min()  # every code-0 channel ranks below every code-1 one


def test_an_active_gate_multiplies_by_its_running_code_in_eval() -> None:
    """After two training passes with momentum 0.5 the running code is the mean of
    ``code_1`` and ``0.5 * code_1 + 0.5 * code_2`` as computed by hand; eval mode multiplies by it."""
    torch.manual_seed(0)
    gate = AutoPrunerGate(5, momentum=0.5, alpha=3.0).train()
    xs = [torch.randn(4, 5, 2, 2) for _ in range(2)]
    codes = [torch.sigmoid(3.0 * gate.fc(x.mean((0, 2, 3)))).detach() for x in xs]
    for x in xs:
        gate.multiplier(x, 1)
    running = 0.5 * codes[0] + 0.5 * codes[1]
    torch.testing.assert_close(gate.running_code, running)
    torch.testing.assert_close(gate.eval().multiplier(xs[0], 1), running)
    torch.testing.assert_close(gate.expected_values(), running)
    assert int(gate.state) == ACTIVE and int(gate.updates) == 2


def test_a_coupled_group_has_one_code_from_its_first_site() -> None:
    """Residual net: the stem's group is gated at three BNs (stem, and the two blocks whose
    sums it joins); in a training pass every site gets the same code, computed by hand from
    the stem BN's output (its first site in forward order, feeding a ReLU)."""
    torch.manual_seed(0)
    model = randomize_bn(Residual()).eval()
    graph = pk.trace(model, X[:1], ignore=["fc"])
    raw = {}
    model.stem[1].register_forward_hook(lambda m, a, out: raw.__setitem__("stem", out.detach()))
    gates = attach_gates(model, graph, kind="autopruner", alpha=2.0)
    group = next(g for g in gates.forward_order() if g.size == 16 and len(gates.sites(g.index)) > 1)
    sites = [name for name, _, _ in gates.sites(group.index)]
    assert sites[0] == "stem.1" and len(sites) == 3
    gate = gates.gate(group.index)
    gate.relu = True
    calls = []
    original = gate.multiplier

    def spy(x: torch.Tensor, dim: int, site: int = 0) -> torch.Tensor:
        out = original(x, dim, site)
        calls.append((site, out))
        return out

    gate.multiplier = spy  # type: ignore[method-assign]
    model.train()(X)
    assert [s for s, _ in calls] == [0, 1, 2] and all(out is calls[0][1] for _, out in calls)
    by_hand = torch.sigmoid(2.0 * gate.fc(torch.relu(raw["stem"]).mean((0, 2, 3))))
    torch.testing.assert_close(calls[0][1], by_hand)
    assert int(gate.state) == ACTIVE and not np.allclose(gate.importance(), 0)
