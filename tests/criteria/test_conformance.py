"""The criteria conformance check: every registered criterion passes it, broken ones fail it."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from prunekit import criteria
from prunekit.errors import PruningError
from prunekit.criteria.conformance import BLIND_TO_DEAD_CHANNELS, DEAD_CHANNEL, check_model


@pytest.mark.parametrize("name", criteria.list_criteria())
def test_every_registered_criterion_conforms(name: str) -> None:
    criteria.check_criterion(name)


def test_blind_list_names_registered_criteria_with_reasons() -> None:
    assert set(BLIND_TO_DEAD_CHANNELS) <= set(criteria.list_criteria())
    assert all(reason.strip() for reason in BLIND_TO_DEAD_CHANNELS.values())


def test_the_planted_channel_is_dead() -> None:
    """Oracle for the check's premise: the channel is zero where it is consumed, on every
    calibration batch, and no weight reads it."""
    model, _, batches = check_model()
    seen = []
    hook = model.tail.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, DEAD_CHANNEL]))
    for x, _ in batches:
        model(x)
    hook.remove()
    assert len(seen) == len(batches) and all(bool((t == 0).all()) for t in seen)
    assert bool((model.tail.weight[:, DEAD_CHANNEL] == 0).all())
    live = [c for c in range(model.body.out_channels) if c != DEAD_CHANNEL]
    assert all(bool((model.body.weight[c] != 0).any()) for c in live)


def _wrong_shape(model: nn.Module, group, **ctx) -> np.ndarray:
    return np.ones(group.size + 1)


def _not_finite(model: nn.Module, group, **ctx) -> np.ndarray:
    s = np.ones(group.size)
    s[0] = np.nan
    return s


def _unseeded(model: nn.Module, group, **ctx) -> np.ndarray:
    return np.random.default_rng().random(group.size)


def _dead_scores_highest(model: nn.Module, group, **ctx) -> np.ndarray:
    return -criteria.get("l1_out")(model, group)


def _edits_the_model(model: nn.Module, group, **ctx) -> np.ndarray:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean += 1  # e.g. a forward pass in training mode
    return criteria.get("l2")(model, group)


def _needs_data(model: nn.Module, group, *, loader=None, **ctx) -> np.ndarray:
    if loader is None:
        raise PruningError("_needs_data needs calibration data")
    return criteria.get("l1_out")(model, group)


def test_data_driven_criteria_get_the_calibration_batches() -> None:
    criteria.check_criterion(_needs_data, data_driven=True)
    with pytest.raises(PruningError, match="needs calibration data"):
        criteria.check_criterion(_needs_data)  # unregistered: data-free unless told


@pytest.mark.parametrize("broken, message", [
    (_wrong_shape, r"_wrong_shape: shape: returned \(9,\) for group 'stem \(\+1 coupled\)' of 8 channels"),
    (_not_finite, "_not_finite: finite"),
    (_unseeded, "_unseeded: determinism"),
    (_dead_scores_highest, "_dead_scores_highest: dead channel: channel 5 of 'body'"),
    (_edits_the_model, "_edits_the_model: side effects: scoring changed stem_bn.running_mean"),
])
def test_broken_criteria_fail_naming_the_property(broken, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        criteria.check_criterion(broken)
