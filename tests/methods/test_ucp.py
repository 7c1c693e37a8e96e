"""UCP's importance: the mean excitation of its SE gates, computed by hand. (The method's
other mechanics: tests/methods/test_methods.py; its training: tests/recover/test_callbacks.py.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nets import cbr, randomize_bn
from prunekit import methods
from prunekit.methods import ucp as ucp_module


def test_ucp_importance_is_the_mean_excitation_by_hand(monkeypatch) -> None:
    """No training (``steps=0``), frozen network: the importance of the first group is the mean
    over the calibration samples of its block's scales at the first conv, and the second
    group's that of the block at the second conv, whose input is the first block's scaled
    output through BN (eval) and ReLU; ratio 0.5 keeps each group's highest half."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(cbr(3, 8), cbr(8, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(6, 4))).eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(5, 3, 8, 8, generator=g), None) for _ in range(2)]
    captured = {}
    record = ucp_module.record_excitation

    def spy(net, gates, batches):  # the gates ucp built, before they are detached
        captured["blocks"] = [gates.gate(i).blocks[0] for i in (0, 1)]
        return record(net, gates, batches)

    monkeypatch.setattr(ucp_module, "record_excitation", spy)
    res = methods.get("ucp")(model, torch.randn(1, 3, 8, 8), loader=calib, steps=0, train_network=False, ratio=0.5,
                             ignore=["4"])

    def excite(z: torch.Tensor, block: nn.Module) -> torch.Tensor:
        return torch.sigmoid(F.linear(torch.relu(F.linear(z.mean((2, 3)), block.fc1.weight, block.fc1.bias)),
                                      block.fc2.weight, block.fc2.bias))

    b1, b2 = captured["blocks"]
    scales1, scales2 = [], []
    with torch.no_grad():
        for x, _ in calib:
            z1 = F.conv2d(x, model[0][0].weight, padding=1)
            s1 = excite(z1, b1)
            a1 = torch.relu(model[0][1](z1 * s1[:, :, None, None]))
            z2 = F.conv2d(a1, model[1][0].weight, padding=1)
            scales1.append(s1)
            scales2.append(excite(z2, b2))
    want = [torch.cat(scales1).mean(0), torch.cat(scales2).mean(0)]
    got = res.info["importance"]
    torch.testing.assert_close(torch.tensor(got["0.0"], dtype=torch.float64), want[0].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got["1.0"], dtype=torch.float64), want[1].double(), rtol=1e-5, atol=1e-6)
    assert res.plan.keep["0.0.weight"][0] == sorted(torch.argsort(want[0], descending=True)[:4].tolist())
    assert res.plan.keep["1.0.weight"][0] == sorted(torch.argsort(want[1], descending=True)[:3].tolist())
