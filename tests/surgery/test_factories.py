"""Every registered module factory: builds from JSON arguments, and describe() rebuilds it."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.errors import PruningError
from prunekit.surgery.factories import FACTORIES, build, describe

SAMPLES = {  # a factory without a sample fails below: add one when registering a factory
    "conv": {"dims": 2, "in_channels": 4, "out_channels": 6, "kernel_size": [3, 1], "stride": [2, 1],
             "padding": [1, 0], "dilation": [1, 1], "groups": 2, "bias": False, "padding_mode": "zeros"},
    "linear": {"in_features": 5, "out_features": 3, "bias": True},
    "batch_norm": {"dims": 2, "num_features": 6, "eps": 1e-3, "momentum": 0.05, "affine": True,
                   "track_running_stats": True},
    "identity": {},
    "zero": {},
    "sequential": {"modules": [{"factory": "linear", "args": {"in_features": 5, "out_features": 2, "bias": False}},
                               {"factory": "identity", "args": {}}]},
    "residual_conv": {"conv": {"factory": "conv", "args": {"dims": 2, "in_channels": 6, "out_channels": 6,
                                                           "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
                                                           "dilation": [1, 1], "groups": 1, "bias": False,
                                                           "padding_mode": "zeros"}},
                      "norm": {"factory": "batch_norm", "args": {"dims": 2, "num_features": 6, "eps": 1e-5,
                                                                 "momentum": 0.1, "affine": True,
                                                                 "track_running_stats": True}}},
    "partitioned_linear": {"in_features": 8, "in_ranges": [[0, 4], [4, 4]], "out_sizes": [3, 2], "bias": True,
                           "parallel": True, "threads": 2},
    "multihead_attention": {"embed_dim": 10, "num_heads": 3, "head_dim": 4, "kdim": 6, "vdim": 5, "out_dim": 7,
                            "bias": True, "add_bias_kv": True, "add_zero_attn": False, "dropout": 0.0,
                            "batch_first": True, "packed": False},
}


@pytest.mark.parametrize("name", FACTORIES.names())
def test_factory_builds_and_describe_inverts_it(name: str) -> None:
    assert name in SAMPLES, f"factory '{name}' has no sample in SAMPLES"
    args = json.loads(json.dumps(SAMPLES[name]))  # what a plan.json gives back
    module = build(name, args)
    assert describe(module) == (name, args)
    again = build(*describe(module))
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}


def test_built_modules_run_and_bad_arguments_are_named() -> None:
    x = torch.randn(2, 4, 8, 8)
    assert build("conv", SAMPLES["conv"])(x).shape == (2, 6, 4, 8)
    assert torch.equal(build("zero", {})(x), torch.zeros_like(x))
    block = build("residual_conv", SAMPLES["residual_conv"]).eval()  # x + s * BN(conv(x)), s = 1 at build
    y = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(y), y + block.norm(block.conv(y)))
    with pytest.raises(PruningError, match="factory 'linear' rejects its arguments"):
        build("linear", {"in_features": 3})
    with pytest.raises(PruningError, match="no factory describes"):
        describe(torch.nn.GELU())
