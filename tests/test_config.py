"""PruneConfig: one checked, frozen set of pruning options shared by prune(), methods, CLI and recipes."""

from __future__ import annotations

import dataclasses
import doctest
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import prunekit as pk
import prunekit.config
from prunekit import methods
from prunekit.cli import common
from prunekit.cli.main import main
from prunekit.config import FIELDS, PruneConfig
from prunekit.methods import budget_config
from prunekit.recipe import Recipe

X = torch.randn(1, 3, 8, 8)


def _net() -> nn.Module:
    from nets import Residual

    torch.manual_seed(0)
    return Residual().eval()


def test_exported_and_defaults_match_prune_keywords() -> None:
    assert pk.PruneConfig is PruneConfig
    cfg = PruneConfig()
    assert (cfg.ratio, cfg.criterion, cfg.round_to, cfg.min_channels, cfg.max_repairs, cfg.global_ranking) == \
        (0.5, "l2", 1, 1, 32, False)
    assert cfg.target is None and cfg.ignore is None and cfg.ratios is None


def test_from_kwargs_rejects_unknown_keys_naming_them_and_the_valid_ones() -> None:
    with pytest.raises(pk.PruningError, match=r"unknown pruning options 'ratoi', 'colour'.*did you mean 'ratio'") as exc:
        PruneConfig.from_kwargs(ratoi=0.3, colour="red")
    assert all(name in str(exc.value) for name in FIELDS)
    assert PruneConfig.from_kwargs(ratio=0.3, min_channels=2) == PruneConfig(ratio=0.3, min_channels=2)
    with pytest.raises(pk.PruningError, match="'ratoi'"):
        PruneConfig().replace(ratoi=0.3)
    with pytest.raises(pk.PruningError, match="'ratoi'"):  # prune() keywords go through the same check
        pk.prune(_net(), X, ratoi=0.3)


@pytest.mark.parametrize("options,message", [
    ({"ratio": 1.0}, r"^ratio=1\.0: must be in \[0, 1\)"),
    ({"ratio": -0.1}, r"^ratio=-0\.1"),
    ({"ratio": "half"}, r"^ratio='half': must be a number"),
    ({"ratios": {"a": 1.2}}, r"^ratios\['a'\]=1\.2"),
    ({"target_flops": 0.5, "target_params": 0.5}, r"^give one budget, not target_flops, target_params$"),
    ({"target_flops": 0.0}, r"^target_flops=0\.0: must be in \(0, 1\]"),
    ({"target_params": 1.5}, r"^target_params=1\.5: must be in \(0, 1\]"),
    ({"target_latency": float("nan")}, r"^target_latency=nan"),
    ({"target_flops": "x"}, r"^target_flops='x': must be a number"),
    ({"round_to": 0}, r"^round_to=0: must be >= 1"),
    ({"round_to": 2.5}, r"^round_to=2\.5: must be an integer"),
    ({"min_channels": 0}, r"^min_channels=0: must be >= 1"),
    ({"min_channels": True}, r"^min_channels=True: must be an integer"),
    ({"max_repairs": -1}, r"^max_repairs=-1: must be >= 0"),
    ({"global_ranking": "yes"}, r"^global_ranking='yes'"),
    ({"criterion": 3}, r"^criterion=3"),
    ({"ignore": 3}, r"^ignore=3"),
    ({"ratios": [0.5]}, r"^ratios=\[0\.5\]: must be a mapping"),
    ({"latency_table": object()}, r"^latency_table: only used with target_latency"),
])
def test_each_invalid_value_raises_naming_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(pk.PruningError, match=message):
        PruneConfig(**options)
    with pytest.raises(pk.PruningError, match=message):  # the same check for prune() keywords, before any work
        pk.prune(nn.Identity(), X, **options)


def test_values_are_normalised() -> None:
    ratios = {"a": 0}
    cfg = PruneConfig(ratio=0, ignore=["fc"], ratios=ratios, target_flops=1, criterion_kwargs={})
    assert (cfg.ratio, cfg.ignore, cfg.ratios, cfg.target, cfg.criterion_kwargs) == (0.0, ("fc",), {"a": 0.0},
                                                                                      ("flops", 1.0), None)
    assert PruneConfig(ignore="fc").ignore == ("fc",)  # one name, not its letters
    assert PruneConfig(ignore=[], ratios={}) == PruneConfig()
    ratios["a"] = 0.9  # the caller's dict is not the config's
    assert cfg.ratios == {"a": 0.0}


def test_frozen() -> None:
    cfg = PruneConfig(ratio=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ratio = 0.9  # type: ignore[misc]
    changed = cfg.replace(ratio=0.6, round_to=4)
    assert (cfg.ratio, cfg.round_to, changed.ratio, changed.round_to) == (0.3, 1, 0.6, 4)
    with pytest.raises(pk.PruningError, match="round_to=0"):  # replace checks again
        cfg.replace(round_to=0)


def test_to_dict_is_json_and_names_callables_and_modules() -> None:
    def saliency(model: nn.Module, group: Any, **ctx: Any) -> Any:
        return None

    cfg = PruneConfig(criterion=saliency, ignore=[nn.Linear(2, 2), "fc"], ratios={"a": 0.25},
                      criterion_kwargs={"loader": [torch.zeros(1)], "batches": 2})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert list(d) == list(FIELDS)
    assert d["criterion"] == "saliency" and d["ignore"] == ["<Linear>", "fc"] and d["ratios"] == {"a": 0.25}
    assert d["criterion_kwargs"] == {"loader": ["<Tensor>"], "batches": 2} and d["ratio"] == 0.5


def test_config_and_keywords_give_the_same_plan() -> None:
    model = _net()
    _, by_config = pk.prune(model, X, config=PruneConfig(ratio=0.3, ignore=("fc",)), return_plan=True)
    _, by_keywords = pk.prune(model, X, ratio=0.3, ignore=["fc"], return_plan=True)
    _, default = pk.prune(model, X, ignore=["fc"], return_plan=True)
    assert by_config.keep == by_keywords.keep
    assert by_config.keep != default.keep  # the config's ratio was used, not the default 0.5
    assert pk.plan_for(model, X, PruneConfig(ratio=0.3, ignore=("fc",))).keep == by_keywords.keep


def test_keywords_override_the_config() -> None:
    model = _net()
    base = PruneConfig(ratio=0.5, ignore=("fc",), round_to=2)
    _, overridden = pk.prune(model, X, base, ratio=0.3, return_plan=True)
    _, expected = pk.prune(model, X, ratio=0.3, ignore=["fc"], round_to=2, return_plan=True)
    assert overridden.keep == expected.keep and overridden.meta["round_to"] == 2
    with pytest.raises(pk.PruningError, match="give one budget"):  # the combination is checked as a whole
        pk.prune(model, X, PruneConfig(target_flops=0.5), target_params=0.5)
    with pytest.raises(pk.PruningError, match="config: expected a PruneConfig, got dict"):
        pk.prune(model, X, {"ratio": 0.3})


def test_methods_take_a_config_and_check_their_keywords() -> None:
    assert budget_config({"config": PruneConfig(ratio=0.3), "round_to": 2, "ignore": None}, "m") == \
        PruneConfig(ratio=0.3, round_to=2)
    with pytest.raises(pk.PruningError, match=r"method 'cap': unknown option 'target_flop'.*budget options: ratio"):
        budget_config({"target_flop": 0.5}, "cap")
    with pytest.raises(pk.PruningError, match="method 'cap': unknown option 'criterion'"):  # cap scores itself
        methods.get("cap")(_net(), X, criterion="l1")
    model = _net()
    by_config = methods.get("criterion:l1")(model, X, config=PruneConfig(ratio=0.3, ignore=("fc",)))
    by_keywords = methods.get("criterion:l1")(model, X, ratio=0.3, ignore=["fc"])
    assert by_config.plan.keep == by_keywords.plan.keep and by_config.plan.meta["criterion"] == "l1"


class _Stop(Exception):
    """Ends a CLI run once its pruning options are known."""


def _cli_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str) -> PruneConfig:
    """The PruneConfig that ``prunekit prune ARGV`` prunes with (stopped before pruning)."""
    seen: list[PruneConfig] = []

    def stop(model: Any, x: Any, r: Recipe) -> None:
        seen.append(common.prune_options(r))
        raise _Stop

    monkeypatch.setattr("prunekit.cli.prune.prune_with_recipe", stop)
    with pytest.raises(_Stop):
        main(["prune", "--model", "small_cnn", "--out", str(tmp_path / "out"), *argv])
    return seen[0]


def test_recipe_file_and_cli_flags_resolve_to_the_same_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("ratio: 0.3\ncriterion: l1\nignore: [fc]\nratios: {features.3: 0.6}\nglobal_ranking: true\n"
                      "round_to: 8\nmin_channels: 4\ntarget_params: 0.5\n")
    from_recipe = _cli_config(monkeypatch, tmp_path, "--recipe", str(recipe))
    from_flags = _cli_config(monkeypatch, tmp_path, "--ratio", "0.3", "--criterion", "l1", "--ignore", "fc",
                             "--ratios", "features.3=0.6", "--global-ranking", "--round-to", "8",
                             "--min-channels", "4", "--target-params", "0.5")
    expected = PruneConfig(ratio=0.3, criterion="l1", ignore=("fc",), ratios={"features.3": 0.6},
                           global_ranking=True, round_to=8, min_channels=4, target_params=0.5)
    assert from_recipe == from_flags == expected
    assert _cli_config(monkeypatch, tmp_path, "--recipe", str(recipe), "--min-channels", "2") == \
        expected.replace(min_channels=2)  # a flag wins over the recipe
    assert common.prune_options(Recipe()) == PruneConfig()  # recipe defaults are the config's


def test_docstring_examples() -> None:
    result = doctest.testmod(prunekit.config, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
