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


def test_fold_needs_approximate_and_then_folds_each_sites_mean() -> None:
    model = _net()
    weight = model[0][0].weight.detach().clone()
    gates = attach_gates(model, pk.trace(model, X[:1], ignore=["4"]), kind="se", at="producers")
    gate = gates.gate(0)
    gate.recording = True
    with torch.no_grad():
        model(X)
    gate.recording = False
    mean = gate.site_expected_values(0).clone()
    with pytest.raises(pk.PruningError, match="depends on the input"):
        gates.fold()
    gates.fold(approximate=True)
    torch.testing.assert_close(model[0][0].weight.detach(), weight * mean.view(-1, 1, 1, 1))
    assert gate.identity  # the folded gate now multiplies by 1
    gates.detach()
