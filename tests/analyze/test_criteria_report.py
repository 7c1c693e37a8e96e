"""Criteria analyser: correlations against scipy and hand formulas, distinguishability by hand,
normality on seeded Gaussian vs. non-Gaussian layers, files written, CLI errors."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import Residual
from scipy import stats
from torch import nn

import prunekit as pk
from prunekit.analyze import (
    criteria_report,
    distinguishability,
    weight_normality,
    write_report,
)
from prunekit.cli.main import main
from prunekit.criteria import score_groups


def _strict_json(text: str) -> object:
    """json.loads that fails on NaN/Infinity (which are not JSON)."""
    def bad(token: str) -> object:
        raise ValueError(f"non-JSON constant {token}")
    return json.loads(text, parse_constant=bad)


def _residual() -> nn.Module:
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # distinct gammas, so that 'bn' ranks channels
                m.weight.uniform_(0.2, 2.0)
    return model


class ConvStack(nn.Module):
    """conv_a (16 -> 48) -> conv_b (48 -> 32) -> pool -> fc; weights set by the tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(16, 48, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(48, 32, 3, padding=1, bias=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv_b(torch.relu(self.conv_a(x)))).mean((2, 3)))


def _stack(conv_b: str, seed: int = 0) -> nn.Module:
    """ConvStack with i.i.d. N(0, 0.05^2) weights, except conv_b: 'gauss', 'signs' (+-0.05) or 'bimodal'."""
    g = torch.Generator().manual_seed(seed)
    model = ConvStack().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        w = model.conv_b.weight
        if conv_b == "signs":
            w.copy_(0.05 * (torch.randint(0, 2, w.shape, generator=g) * 2 - 1).float())
        elif conv_b == "bimodal":
            w.copy_(0.05 * ((torch.randint(0, 2, w.shape, generator=g) * 2 - 1) + 0.2 * torch.randn(w.shape, generator=g)))
    return model


X16 = torch.randn(1, 16, 8, 8)


# ------------------------------------------------------------------------ correlations


def test_correlations_equal_scipy_on_the_criteria_scores() -> None:
    model = _residual()
    x = torch.randn(1, 3, 16, 16)
    names = ["l1", "l2", "l1_out", "l2_out", "fpgm", "bn"]
    report = criteria_report(model, x, criteria=names)
    graph = pk.trace(model, x)
    expected_groups = [g for g in graph.groups if g.n_prunable >= 4]
    assert [r.name for r in report.groups] == [g.name for g in expected_groups]
    assert len(report.groups) >= 3
    scores = {n: score_groups(model, expected_groups, n) for n in names}
    per_group = {n: [] for n in itertools.combinations(range(len(names)), 2)}
    for gi, (row, g) in enumerate(zip(report.groups, expected_groups)):
        for a, b in itertools.combinations(range(len(names)), 2):
            sa, sb = scores[names[a]][gi][g.prunable], scores[names[b]][gi][g.prunable]
            rho, tau = stats.spearmanr(sa, sb).statistic, stats.kendalltau(sa, sb).statistic
            assert row.spearman[a][b] == pytest.approx(rho, abs=1e-12)
            assert row.spearman[b][a] == pytest.approx(rho, abs=1e-12)
            assert row.kendall[a][b] == pytest.approx(tau, abs=1e-12)
            per_group[(a, b)].append((rho, tau))
        assert [row.spearman[i][i] for i in range(len(names))] == [1.0] * len(names)
    for (a, b), vals in per_group.items():  # the summary is the mean over groups
        assert report.correlation(names[a], names[b]) == pytest.approx(np.mean([v[0] for v in vals]), abs=1e-12)
        assert report.correlation(names[a], names[b], "kendall") == pytest.approx(np.mean([v[1] for v in vals]), abs=1e-12)


def test_rank_correlations_match_hand_formulas_on_hand_computed_scores() -> None:
    # Oracle independent of the criteria code and of scipy: filter norms computed here,
    # Spearman as Pearson of ranks, Kendall by counting concordant/discordant pairs.
    model = _stack("gauss")
    report = criteria_report(model, X16, criteria=["l1_out", "fpgm"], ignore=[model.fc])
    row = next(r for r in report.groups if r.name == "conv_a")
    w = model.conv_a.weight.detach().double().reshape(48, -1)
    l1_out = w.abs().sum(1).numpy()
    fpgm = torch.cdist(w, w).sum(1).numpy()
    np.testing.assert_allclose(row.scores["l1_out"], l1_out, rtol=1e-6)
    np.testing.assert_allclose(row.scores["fpgm"], fpgm, rtol=1e-6)
    ra, rb = np.argsort(np.argsort(l1_out)), np.argsort(np.argsort(fpgm))
    rho = np.corrcoef(ra, rb)[0, 1]
    n = len(l1_out)
    sign = sum(np.sign(l1_out[i] - l1_out[j]) * np.sign(fpgm[i] - fpgm[j]) for i in range(n) for j in range(i + 1, n))
    tau = sign / (n * (n - 1) / 2)
    assert row.spearman[0][1] == pytest.approx(rho, abs=1e-9)
    assert row.kendall[0][1] == pytest.approx(tau, abs=1e-9)


def test_gaussian_conv_layer_l1_and_l2_rank_alike() -> None:
    model = _stack("gauss", seed=1)
    report = criteria_report(model, X16, criteria=["l1", "l2"], ignore=[model.fc])
    row = next(r for r in report.groups if r.name == "conv_a")
    assert row.n_channels == 48
    assert row.spearman[0][1] > 0.9
    assert report.correlation("l1", "l2") > 0.9


def test_constant_criterion_gives_undefined_correlation_and_strict_json(tmp_path: Path) -> None:
    model = Residual().eval()  # untrained BN: every gamma is 1, so 'bn' cannot rank
    report = criteria_report(model, torch.randn(1, 3, 16, 16), criteria=["l2", "bn"])
    assert all(math.isnan(r.spearman[0][1]) and math.isnan(r.kendall[0][1]) for r in report.groups)
    assert math.isnan(report.correlation("l2", "bn")) and report.pair_counts[0][1] == 0
    assert all(r.distinguishability["bn"].close_fraction == 1.0 for r in report.groups)
    data = _strict_json(json.dumps(report.to_dict(), allow_nan=False))
    assert data["summary"]["mean_spearman"][0][1] is None  # type: ignore[index]


def test_data_criterion_needs_a_loader_and_unknown_names_fail_before_tracing() -> None:
    model = _stack("gauss")
    with pytest.raises(pk.PruningError, match="taylor"):
        criteria_report(model, X16, criteria=["l1", "taylor"])
    with pytest.raises(KeyError, match="no_such"):
        criteria_report(model, "not an input", criteria=["no_such"])


def test_default_criteria_add_data_driven_ones_with_a_loader() -> None:
    model = _stack("gauss")
    assert criteria_report(model, X16, ignore=[model.fc]).criteria == ("l1", "l2", "l1_out", "l2_out", "fpgm", "bn")
    loader = [(torch.randn(4, 16, 8, 8), torch.randint(0, 10, (4,)))]
    report = criteria_report(model, X16, loader=loader, batches=1, ignore=[model.fc])
    assert report.criteria == ("l1", "l2", "l1_out", "l2_out", "fpgm", "bn", "taylor", "taylor_act", "activation", "apoz")
    assert report.meta["data_driven"] == ["taylor", "taylor_act", "activation", "apoz"]


# ------------------------------------------------------------------------ distinguishability


def test_distinguishability_by_hand() -> None:
    d = distinguishability(np.array([10.0, 0.0, 2.0, 1.0]))  # sorted 0 1 2 10: gaps 1 1 8, range 10
    assert d.min_gap == pytest.approx(0.1)
    assert d.close_fraction == 0.0  # nothing within 1% of the range (0.1)
    assert d.cv == pytest.approx(np.std([0, 1, 2, 10]) / 3.25)
    d = distinguishability(np.array([0.0, 0.05, 5.0, 10.0]))  # 0 and 0.05 are within 0.1 of each other
    assert d.close_fraction == 0.5 and d.min_gap == pytest.approx(0.005)
    d = distinguishability(np.full(6, 3.0))
    assert (d.cv, d.min_gap, d.close_fraction) == (0.0, 0.0, 1.0)


# ------------------------------------------------------------------------ normality


@pytest.mark.parametrize("kind", ["signs", "bimodal"])
def test_non_gaussian_layer_is_flagged_and_gaussian_one_is_not(kind: str) -> None:
    model = _stack(kind, seed=2)
    report = criteria_report(model, X16, criteria=["l1"], ignore=[model.fc])
    layers = {m.layer: m for r in report.groups for m in r.layers}
    assert set(layers) == {"conv_a.weight", "conv_b.weight"}
    gauss, odd = layers["conv_a.weight"], layers["conv_b.weight"]
    assert gauss.n_weights == 48 * 16 * 9 and odd.n_weights == 32 * 48 * 9
    assert odd.n_sampled == 5000  # Shapiro on a seeded sample of the 13,824 weights
    assert gauss.looks_gaussian and gauss.shapiro_p > 0.05 and gauss.normaltest_p > 0.05
    assert abs(gauss.excess_kurtosis) < 0.2
    assert not odd.looks_gaussian and odd.shapiro_p < 1e-6
    assert odd.excess_kurtosis < -1.5  # random signs: -2; a narrow two-peak mixture: about -1.9
    assert report.gaussian_fraction == 0.5 and report.n_layers == 2


def test_weight_normality_is_seeded_and_matches_scipy() -> None:
    w = np.random.default_rng(3).standard_t(df=3, size=8000)  # heavy tails
    a, b = weight_normality(w, seed=7), weight_normality(w, seed=7)
    assert a == b and not a.looks_gaussian and a.excess_kurtosis > 1
    assert a.normaltest_p == pytest.approx(stats.normaltest(w).pvalue)
    assert a.excess_kurtosis == pytest.approx(stats.kurtosis(w))
    # On Gaussian weights the p-values are moderate, so they pin down which sample was tested.
    g = np.random.default_rng(4).normal(size=8000)
    b = weight_normality(g, seed=7)
    sample = np.random.default_rng(7).choice(g, size=5000, replace=False)
    assert 1e-3 < b.shapiro_p == pytest.approx(stats.shapiro(sample).pvalue, rel=1e-9)
    assert 1e-3 < b.normaltest_p == pytest.approx(stats.normaltest(g).pvalue, rel=1e-9)
    assert weight_normality(g, seed=8).shapiro_p != b.shapiro_p and b.n_sampled == 5000


# ------------------------------------------------------------------------ files and CLI


def test_write_report_files(tmp_path: Path) -> None:
    model = _residual()
    report = criteria_report(model, torch.randn(1, 3, 16, 16), criteria=["l1", "l2", "fpgm"])
    paths = write_report(report, tmp_path / "out")
    assert {k: p.name for k, p in paths.items()} == {
        "json": "criteria_report.json", "markdown": "criteria_report.md", "heatmap": "criteria_heatmap.png"}
    data = _strict_json(paths["json"].read_text())
    assert data["criteria"] == ["l1", "l2", "fpgm"]  # type: ignore[index]
    assert len(data["groups"]) == len(report.groups)  # type: ignore[index]
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    assert "Mean Spearman" in md and "Mean Kendall" in md and "| `l1` |" in md
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temp files


def test_cli_writes_the_three_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "analysis"
    rc = main(["analyze", "criteria", "--model", "small_cnn", "--dataset", "digits", "--batches", "1",
               "--batch-size", "16", "--criteria", "l1,l2,fpgm,activation", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["criteria_heatmap.png", "criteria_report.json", "criteria_report.md"]
    data = _strict_json((out / "criteria_report.json").read_text())
    assert data["criteria"] == ["l1", "l2", "fpgm", "activation"]  # type: ignore[index]
    assert len(data["summary"]["mean_spearman"]) == 4  # type: ignore[index]
    assert data["meta"]["model"] == "small_cnn" and data["meta"]["data"] == "digits"  # type: ignore[index]
    assert "mean Spearman" in capsys.readouterr().out


def _fail(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(["analyze", "criteria", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunekit analyze: error: "), err
    return lines[0]


def test_cli_unknown_criterion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, "--model", "small_cnn", "--criteria", "l1,l3", "--out", str(tmp_path / "o"))
    assert "--criteria" in err and "'l3'" in err and "l2" in err
    assert not (tmp_path / "o").exists()


def test_cli_bad_data_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o")
    err = _fail(capsys, "--model", "small_cnn", "--criteria", "l1,taylor", "--out", out)
    assert "--criteria" in err and "taylor" in err
    err = _fail(capsys, "--model", "resnet20", "--dataset", "cifar10", "--out", out)
    assert "--data" in err and "cifar10" in err
    missing = tmp_path / "nothing.npz"
    err = _fail(capsys, "--model", "resnet20", "--dataset", "cifar10", "--data", str(missing), "--out", out)
    assert "--data" in err and str(missing) in err
    err = _fail(capsys, "--model", "resnet20", "--dataset", "cifar11", "--out", out)
    assert "--dataset cifar11" in err
    assert not (tmp_path / "o").exists()
