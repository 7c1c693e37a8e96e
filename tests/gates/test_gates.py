"""Channel gates: exact at 1, real submodules, shared across coupled channels, fold, gates -> plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import prunekit as pk
from nets import randomize_bn
from prunekit.allocate.cost import CostModel
from prunekit.gates import GATES, Gate, attach_gates, gate_kinds, prune_with_gates
from prunekit.measure import count_flops
from prunekit.recover import Callback, TrainConfig, train
from prunekit.runtime import model_mode
from prunekit.zoo import resolve_model


def _models() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    vit = VisionTransformer(32, 16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: the output would not move
    return [("resnet18", randomize_bn(torchvision.models.resnet18(num_classes=10)), torch.randn(2, 3, 32, 32)),
            ("mobilenet_v2", randomize_bn(torchvision.models.mobilenet_v2(num_classes=10)), torch.randn(2, 3, 32, 32)),
            ("vit", vit, torch.randn(2, 3, 32, 32)),
            ("resnet20", randomize_bn(resolve_model("resnet20")), torch.randn(2, 3, 32, 32))]


@pytest.mark.parametrize("name,model,x", _models(), ids=lambda v: v if isinstance(v, str) else "")
def test_gates_at_one_compute_the_original_exactly(name: str, model: nn.Module, x: torch.Tensor) -> None:
    graph = pk.trace(model.eval(), x)
    with torch.no_grad():
        want = {mode: _run(model, x, mode) for mode in ("eval", "train")}
    gates = attach_gates(model, graph, kind="scale")
    # nn.MultiheadAttention's heads live inside one fused call: no module output carries them,
    # so they hold no gate (gate-based methods rank them by l2). Every other group has one.
    heads = [g.name for g in graph.groups if g.name.endswith("self_attention")]
    assert len(gates.gates) > 0 and gates.ungated == heads and (name == "vit") == bool(heads)
    with torch.no_grad():
        for mode in ("eval", "train"):
            assert torch.equal(_run(model, x, mode), want[mode])
        for gate in gates.gates.values():
            gate.weight.fill_(0.5)  # the gates really act
        assert not torch.equal(_run(model, x, "eval"), want["eval"])


def _run(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    with model_mode(model, mode):
        return model(x)


def test_gates_are_submodules_and_detach_restores_the_tree() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    graph = pk.trace(model, x)
    gates = attach_gates(model, graph, kind="logit", temperature=2.0)
    gate_params = {id(p) for p in gates.parameters()}
    assert gate_params <= {id(p) for p in model.parameters()}
    extra = [k for k in model.state_dict() if k not in keys]
    assert extra and all(".prunekit_gate_" in k for k in extra)
    assert any(k.endswith("temperature") for k in extra)  # schedules' state is checkpointed
    with pytest.raises(pk.PruningError, match="already has gates"):
        attach_gates(model, graph)
    gates.detach()
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_modules()] == names
    assert all(not m._forward_hooks for m in model.modules())


def test_residual_coupled_channels_share_one_gate() -> None:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = pk.trace(model, x, ignore=[model.fc])
    group = next(g for g in graph.groups if "layer1.0.conv2" in g.modules())  # stem + layer1 sum
    gates = attach_gates(model, graph, kind="scale")
    seen = {}
    model.layer1.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    with torch.no_grad():
        gates.gate(group.index).weight[3] = 0.0
        model(x)
    out = seen["out"]
    assert torch.all(out[:, 3] == 0)  # the channel is silenced in the whole residual stream
    assert (out[:, [c for c in range(out.shape[1]) if c != 3]] != 0).any(dim=(0, 2, 3)).all()


@pytest.mark.parametrize("kind", ["scale", "logit"])
def test_fold_then_detach_keeps_the_gated_function(kind: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = pk.trace(model, x)
    gates = attach_gates(model, graph, kind=kind)
    with torch.no_grad():
        for gate in gates.gates.values():
            next(gate.parameters()).copy_(torch.rand(gate.size) * 2 - 0.5)
        gated = model(x)
        gates.fold()
        assert torch.allclose(model(x), gated, rtol=1e-4, atol=1e-5)  # still attached, now at 1
        gates.detach()
        assert torch.allclose(model(x), gated, rtol=1e-4, atol=1e-5)


def test_gate_values_are_the_scores_of_the_allocator() -> None:
    torch.manual_seed(0)
    model = randomize_bn(resolve_model("resnet20")).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = pk.trace(model, x, ignore=["fc"])
    gates = attach_gates(model, graph, kind="scale")
    rng = np.random.default_rng(0)
    planted = {}
    with torch.no_grad():
        for g in gates.groups:
            low = rng.choice(g.size, size=g.size // 4, replace=False)
            gates.gate(g.index).weight[torch.as_tensor(low)] = 0.01
            planted[g.index] = set(low.tolist())
    small, plan = prune_with_gates(model, x, gates, graph, ratio=0.25)
    assert not any("prunekit_gate" in n for n, _ in model.named_modules())
    for g in gates.groups:
        member = next(m for m in g.members if m.role == "out")
        kept = set(plan.keep[member.tensor][member.dim])
        removed = {int(member.channel[i]) for i in range(len(member.channel)) if i not in kept and member.channel[i] >= 0}
        assert removed == planted[g.index]


def test_gates_to_plan_meets_a_budget_with_round_to_and_min_channels() -> None:
    torch.manual_seed(0)
    model = randomize_bn(resolve_model("resnet20")).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = pk.trace(model, x, ignore=["fc"])
    gates = attach_gates(model, graph, kind="logit")
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.logit.copy_(torch.randn(gate.size))
    base = count_flops(model, x)
    small, plan = prune_with_gates(model, x, gates, graph, target_flops=0.5, round_to=4, min_channels=8)
    kept = count_flops(small, x) / base
    assert 0.49 <= kept <= 0.5
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 4 == 0 and w >= 8 for w in widths)
    assert small.fc.out_features == 10


class _L1OnGates(Callback):
    def __init__(self, gates, strength: float) -> None:
        self.gates, self.strength = gates, strength

    def extra_loss(self, model, batch):
        return self.strength * sum(g.values().sum() for g in self.gates.gates.values())


def test_gates_train_in_the_loop_and_expected_flops_is_differentiable() -> None:
    torch.manual_seed(0)
    model = resolve_model("resnet20")
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    graph = pk.trace(model.eval(), x[:1], ignore=["fc"])
    gates = attach_gates(model, graph, kind="logit")
    before = {k: v.detach().clone() for k, v in gates.state_dict().items()}
    cfg = TrainConfig(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", seed=0, tensorboard=False)
    train(model, [(x, y)] * 3, cfg, progress=False, callbacks=[_L1OnGates(gates, 1.0)])
    logits = [k for k in before if k.endswith("logit")]
    assert all(not torch.equal(before[k], gates.state_dict()[k]) for k in logits)
    assert all((gates.state_dict()[k] < before[k]).all() for k in logits)  # the L1 pull lowers every gate
    cost = CostModel(graph, model, x[:1])
    expected = cost.flops(gates.mask(graph.groups))
    expected.backward()
    grads = [g.logit.grad for g in gates.gates.values()]
    assert all(gr is not None and (gr > 0).all() for gr in grads)
    assert float(expected.detach()) < cost.base_flops


@pytest.mark.parametrize("kind", gate_kinds())
def test_every_gate_kind_conforms(kind: str) -> None:
    gate = GATES.get(kind)(6)
    assert isinstance(gate, Gate)
    vals = gate.multiplier(torch.randn(2, 6, 3, 3), 1)
    assert vals.shape[-1] == 6 and torch.isfinite(vals).all()
    imp = gate.importance()
    assert imp.shape == (6,) and np.isfinite(imp).all()
    model = resolve_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    graph = pk.trace(model, x)
    attach_gates(model, graph, kind=kind)
    assert model(x).shape == (1, 10)


def test_torch_compile_sees_the_gates() -> None:
    """Dynamo traces through the gate hooks: same output, gradients reach the gate logits."""
    torch.manual_seed(0)
    model = resolve_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    gates = attach_gates(model, pk.trace(model, x, ignore=["fc"]), kind="logit")
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.logit.copy_(torch.randn(gate.size))
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(g.logit.grad is not None and g.logit.grad.abs().sum() > 0 for g in gates.gates.values())


def test_a_sequential_root_and_a_layer_holding_two_groups() -> None:
    """Gates never become a layer of an nn.Sequential root; a norm after a concat holds two."""

    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(10)
            self.head = nn.Conv2d(10, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))

    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    want = seq(x)
    gates = attach_gates(seq, pk.trace(seq, x), kind="scale")
    assert len(seq) == 3 and torch.equal(seq(x), want)
    model = randomize_bn(Cat()).eval()
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    gates = attach_gates(model, pk.trace(model, x), kind="scale")
    assert sorted(n for n, _ in model.bn.named_children()) == ["prunekit_gate_0", "prunekit_gate_1"]
    assert torch.equal(model(x), want)
    with torch.no_grad():
        gates.gate(1).weight.zero_()
    assert torch.all(model.bn(torch.cat([model.a(x), model.b(x)], 1))[:, 4:] == 0)
    gates.detach()
    assert not list(model.bn.named_children())


class _Cat(nn.Module):
    """Two convs concatenated before one BN: groups {a, bn[:4]} and {b, bn[4:]}."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))

    @staticmethod
    def oracle(m: "_Cat", x: torch.Tensor, scales: list[torch.Tensor]) -> torch.Tensor:
        """The network with each group's channels scaled by hand right after the BN."""
        s = torch.cat(scales).view(1, -1, 1, 1)
        return m.head(torch.relu(m.bn(torch.cat([m.a(x), m.b(x)], 1)) * s))


class _Sum(nn.Module):
    """Two convs summed before one BN: one group {a, b, bn}."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.a(x) + self.b(x))))

    @staticmethod
    def oracle(m: "_Sum", x: torch.Tensor, scales: list[torch.Tensor]) -> torch.Tensor:
        return m.head(torch.relu(m.bn(m.a(x) + m.b(x)) * scales[0].view(1, -1, 1, 1)))


class _PreAct(nn.Module):
    """A pre-activation residual stream: the stem conv feeds bn1 and, through the sum, bn2;
    the branch conv reaches bn2 only through the sum. One group {stem, bn1, branch, bn2}
    besides the branch's inner one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.inner = nn.Conv2d(6, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 6, 1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(x)
        x1 = x0 + self.branch(torch.relu(self.inner(torch.relu(self.bn1(x0)))))
        return self.head(torch.relu(self.bn2(x1)).mean((2, 3)))

    @staticmethod
    def oracle(m: "_PreAct", x: torch.Tensor, scales: list[torch.Tensor]) -> torch.Tensor:
        """Stream channels scaled after bn1 and after bn2; the inner conv's after itself."""
        s, t = scales[0].view(1, -1, 1, 1), scales[1].view(1, -1, 1, 1)
        x0 = m.stem(x)
        x1 = x0 + m.branch(torch.relu(m.inner(torch.relu(m.bn1(x0) * s)) * t))
        return m.head(torch.relu(m.bn2(x1) * s).mean((2, 3)))


@pytest.mark.parametrize("cls", [_Cat, _Sum, _PreAct], ids=["concat", "sum", "preact"])
def test_each_channel_is_gated_once_where_producers_reach_a_norm_through_other_ops(cls: type) -> None:
    """Gates of 0.5 and random values in (0.2, 0.9) against the network with the channels
    scaled by hand after the group's norm (a producer that reaches the norm through a concat
    or a sum is not gated a second time at its own output)."""
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = pk.trace(model, x)
    gates = attach_gates(model, graph, kind="scale")
    order = gates.forward_order()
    for values in ("half", "random"):
        scales = [torch.full((g.size,), 0.5) if values == "half" else 0.2 + 0.7 * torch.rand(g.size) for g in order]
        with torch.no_grad():
            for g, s in zip(order, scales):
                gates.gate(g.index).weight.copy_(s)
            got = model(x)
        gates.detach()
        with torch.no_grad():
            want = cls.oracle(model, x, scales)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        gates = attach_gates(model, graph, kind="scale")


def test_attention_out_proj_holds_no_gate_and_fold_keeps_the_function() -> None:
    """nn.MultiheadAttention uses out_proj's weight without calling it: a gate there would never
    act, and folding into it would change the model."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=5).eval()
    torch.nn.init.normal_(model.heads.head.weight)
    x = torch.randn(2, 3, 32, 32)
    graph = pk.trace(model, x)
    gates = attach_gates(model, graph, kind="scale")
    assert not [s for s in gates._sites if s.name.endswith("out_proj")]
    with torch.no_grad():
        for gate in gates.gates.values():
            next(gate.parameters()).copy_(torch.rand(gate.size) * 2 - 0.5)
        gated = model(x)
        gates.fold()
        gates.detach()
        assert torch.allclose(model(x), gated, rtol=1e-4, atol=1e-5)
