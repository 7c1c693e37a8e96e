"""The ``se`` gate kind (UCP's squeeze-excitation blocks): one block per site at the
producers, identity reproduces the network, per-sample scales, recorded means, approximate fold."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from nets import Residual, cbr, randomize_bn
from prunekit.gates import attach_gates
from prunekit.gates.se import SeGate

X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(cbr(3, 8), cbr(8, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(6, 4))).eval()


def test_se_gates_set_to_one_compute_the_original_function() -> None:
    """On a residual net (coupled groups gated at several producers): the SE scales change the
    output; every gate set to 1 gives exactly the original in eval and train mode."""
    torch.manual_seed(0)
    model = randomize_bn(Residual()).eval()
    reference = copy.deepcopy(model)
    gates = attach_gates(model, pk.trace(model, X[:1], ignore=["fc"]), kind="se", at="producers", reduction=4)
    assert any(len(g.blocks) > 1 for g in gates.gates.values())  # the stem's group: one block per producer
    with torch.no_grad():
        assert not torch.allclose(model(X), reference(X))
        for gate in gates.gates.values():
            gate.set_identity()
        for mode in (False, True):
            a, b = copy.deepcopy(model).train(mode), copy.deepcopy(reference).train(mode)
            assert torch.equal(a(X), b(X))


def test_se_scales_are_per_sample_and_recorded_means_are_the_mean_excitation() -> None:
    """Hand computation at the first conv: ``s = sigmoid(W2 relu(W1 mean_hw(conv(x)) + b1) + b2)``
    (8 channels <= 16: hidden width 1 with biases) multiplies each sample's conv output; the
    recorded mean is ``s`` averaged over the samples."""
    model = _net()
    gates = attach_gates(model, pk.trace(model, X[:1], ignore=["4"]), kind="se", at="producers")
    gate = gates.gate(0)
    assert isinstance(gate, SeGate) and [n for n, _, _ in gates.sites(0)] == ["0.0"]
    block = gate.blocks[0]
    seen = []
    model[0][1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    gate.recording = True
    with torch.no_grad():
        model(X)
        z = F.conv2d(X, model[0][0].weight, padding=1)
        s = torch.sigmoid(F.linear(torch.relu(F.linear(z.mean((2, 3)), block.fc1.weight, block.fc1.bias)),
                                   block.fc2.weight, block.fc2.bias))
    assert s.shape == (6, 8) and not torch.allclose(s[0], s[1])  # one scale per sample
    torch.testing.assert_close(seen[0], z * s[:, :, None, None])
    torch.testing.assert_close(gate.expected_values(), s.mean(0))
    torch.testing.assert_close(torch.from_numpy(gate.importance()).float(), s.mean(0))


def _record_means(model: nn.Module, gates) -> None:
    for gate in gates.gates.values():
        gate.recording = True
    with torch.no_grad():
        model(X)
    for gate in gates.gates.values():
        gate.recording = False


def _scaled_reference(model: nn.Module, scales: dict[str, torch.Tensor]) -> torch.Tensor:
    """The oracle: ``model`` (gates detached) with each named conv's output multiplied by its
    fixed per-channel scale in a hook, in eval mode."""
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, s=s: out * s.view(1, -1, 1, 1))
               for n, s in scales.items()]
    with torch.no_grad():
        out = model.eval()(X)
    for h in handles:
        h.remove()
    return out


def test_fold_needs_approximate_and_then_folds_each_sites_mean_into_the_batch_norm_after_it() -> None:
    """conv -> BN: the site's mean scale is absorbed by the BN's running statistics (the conv
    weights keep their size) and the folded model equals the original with that scale applied
    at each conv's output."""
    model = _net()
    weights = [model[i][0].weight.detach().clone() for i in (0, 1)]
    reference = copy.deepcopy(model)
    gates = attach_gates(model, pk.trace(model, X[:1], ignore=["4"]), kind="se", at="producers")
    _record_means(model, gates)
    means = {"0.0": gates.gate(0).site_expected_values(0).clone(), "1.0": gates.gate(1).site_expected_values(0).clone()}
    with pytest.raises(pk.PruningError, match="depends on the input"):
        gates.fold()
    gates.fold(approximate=True)
    assert gates.gate(0).identity  # the folded gate now multiplies by 1
    gates.detach()
    for i in (0, 1):
        assert torch.equal(model[i][0].weight.detach(), weights[i])
        assert not torch.equal(model[i][1].running_mean, reference[i][1].running_mean)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), _scaled_reference(reference, means), rtol=1e-5, atol=1e-5)


def test_fold_goes_into_the_weights_where_no_batch_norm_reads_the_output_directly() -> None:
    """conv -> ReLU -> BN and conv -> ReLU (no norm): the scale is multiplied into the conv's
    weight and bias; the folded model equals the scaled original."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
                                       nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(6, 4))).eval()
    reference = copy.deepcopy(model)
    gates = attach_gates(model, pk.trace(model, X[:1], ignore=["7"]), kind="se", at="producers")
    _record_means(model, gates)
    means = {name: gates.gate(g.index).site_expected_values(0).clone()
             for g in gates.groups for name, _, _ in gates.sites(g.index)}
    assert set(means) == {"0", "3"}
    gates.fold(approximate=True)
    gates.detach()
    torch.testing.assert_close(model[0].weight.detach(), reference[0].weight * means["0"].view(-1, 1, 1, 1))
    torch.testing.assert_close(model[0].bias.detach(), reference[0].bias * means["0"])
    assert torch.equal(model[2].running_mean, reference[2].running_mean)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _scaled_reference(reference, means), rtol=1e-5, atol=1e-5)


def test_a_batch_norm_absorbs_a_positive_input_scale_exactly_and_refuses_others() -> None:
    """The handler's ``absorb_input_scale``: in eval mode ``bn'(x) == bn(x * s)`` for s > 0
    (hand check against F.batch_norm); a scale with a non-positive entry changes nothing."""
    from prunekit.handlers import handler_for

    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(5)))[0].eval()
    s = torch.tensor([0.5, 2.0, 1e-3, 1.0, 30.0])
    x = torch.randn(3, 5, 4, 4)
    expected = F.batch_norm(x * s.view(1, -1, 1, 1), bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                            0.0, bn.eps)
    before = bn.running_mean.clone()
    assert not handler_for(bn).absorb_input_scale(bn, torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(bn.running_mean, before)
    assert handler_for(bn).absorb_input_scale(bn, s)
    with torch.no_grad():
        torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-5)
    ln = nn.GroupNorm(1, 5)
    assert not handler_for(ln).absorb_input_scale(ln, s)
