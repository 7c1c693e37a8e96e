"""SCP: the final selection and fold against a hand-built oracle; which groups read their BN."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from nets import Residual, cbr
from prunekit import methods
from prunekit.recover import TrainConfig


def test_without_training_scp_removes_the_likeliest_dead_channels_and_folds_the_rest() -> None:
    """lr 0 (the masks too) and no budget term: the network is the given one, so the result must be, by hand,
    the 4 of 8 channels with the highest Phi(beta / |gamma|) (scipy), each scaled by it."""
    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 8), nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    gamma = torch.tensor([1.0, -0.5, 2.0, 0.3, 1.0, 0.7, -1.5, 0.2])
    beta = torch.tensor([0.1, 0.4, -1.0, 0.2, -0.3, 0.8, 0.0, -0.1])
    with torch.no_grad():
        model[0][1].weight.copy_(gamma)
        model[0][1].bias.copy_(beta)
    model[0][1].momentum = 0.0  # the training epoch leaves the running statistics as they are
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))]
    frozen = TrainConfig(epochs=1, lr=0.0, momentum=0.0, weight_decay=0.0, schedule="constant", tensorboard=False)
    res = methods.get("scp")(model, x, loader=data, train_config=frozen, budget_weight=0.0, mask_lr=None, ratio=0.4,
                             ignore=["1"])
    p = norm.cdf(beta.numpy() / np.abs(gamma.numpy()))
    keep = np.sort(np.argsort(-p)[:4])
    assert res.plan.keep["0.0.weight"][0] == keep.tolist()
    oracle = nn.Sequential(cbr(3, 4), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    idx = torch.as_tensor(keep)
    scale = torch.as_tensor(p[keep], dtype=torch.float32)
    with torch.no_grad():
        oracle[0][0].weight.copy_(model[0][0].weight[idx])
        oracle[0][1].weight.copy_(gamma[idx] * scale)
        oracle[0][1].bias.copy_(beta[idx] * scale)
        oracle[0][1].running_mean.copy_(model[0][1].running_mean[idx])
        oracle[0][1].running_var.copy_(model[0][1].running_var[idx])
        oracle[1].weight.copy_(model[1].weight[:, idx])
        oracle[1].bias.copy_(model[1].bias)
        z = torch.randn(5, 3, 8, 8)
        torch.testing.assert_close(res.model(z), oracle(z))
    assert res.info["bn_relu_groups"] == ["0.0"] and res.info["logit_groups"] == []


def test_residual_streams_get_a_plain_logit_and_say_so() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))]
    res = methods.get("scp")(model, x, loader=data, epochs=1, ratio=0.25, ignore=["fc"])
    assert len(res.info["bn_relu_groups"]) == 2 and len(res.info["logit_groups"]) == 1
    assert "plain learned logit" in res.info["logit_groups_note"]


def test_mask_parameters_get_their_own_learning_rate() -> None:
    """The bound BN's gamma and beta (and free logits) leave the weights' param group for one at
    ``mask_lr``; the other parameters stay."""
    from prunekit.gates import attach_gates
    from prunekit.methods._training import ExpectedCost, working_copy
    from prunekit.methods.scp import _ScpTraining, bind_to_batchnorm
    from prunekit.config import PruneConfig

    torch.manual_seed(0)
    model = Residual().eval()
    work = working_copy(model, torch.randn(1, 3, 8, 8), PruneConfig(ratio=0.3, ignore=("fc",)))
    gates = attach_gates(work.model, work.graph, kind="scp")
    bind_to_batchnorm(work.model, work.graph, gates)
    opt = torch.optim.SGD(work.model.parameters(), lr=0.01)
    cb = _ScpTraining(gates, ExpectedCost(work.cost, work.config), 1.0, mask_lr=0.5)
    cb.on_train_start(work.model, opt)
    mask = {id(p) for p in cb.mask_parameters()}
    bn = work.model.a[0][1]  # the first conv -> BN -> ReLU of branch a: a bound group
    assert {id(bn.weight), id(bn.bias)} <= mask and len(opt.param_groups) == 2
    assert {id(p) for p in opt.param_groups[1]["params"]} == mask and opt.param_groups[1]["lr"] == 0.5
    assert not mask & {id(p) for p in opt.param_groups[0]["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(work.model.parameters()))
