"""partition: PartitionedLinear against a dense block matrix, the partitioned network against
the original with its pruned weights zeroed, balance, unit choice by hand, parallel = sequential,
budgets, save/load, ONNX, the CLI."""

from __future__ import annotations

import copy
import json
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import methods
from prunekit.errors import PruningError
from prunekit.measure import count_flops, count_params
from prunekit.surgery.partitioned import PartitionedLinear

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
FC = ("classifier.0", "classifier.3")  # the hidden FC layers; classifier.6 gives the classes


class TinyVGG(nn.Module):
    """Conv features flattened into a 3-layer FC stack (the layers partition pruning splits)."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(128, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, hidden),
                                        nn.ReLU(), nn.Dropout(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _net(hidden: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return TinyVGG(hidden).eval()


def _run(model: nn.Module, P: int, **kw) -> methods.MethodResult:
    return methods.get("partition")(model, X, partitions=P, min_params=1000, **kw)


def _parts(size: int, P: int) -> list[np.ndarray]:
    return np.array_split(np.arange(size), P)


@torch.no_grad()
def _zeroed(model: nn.Module, P: int, kept: dict[str, list[list[int]]]) -> nn.Module:
    """The oracle: the original with the cross-partition weights of the second FC layer and
    every removed unit's weights and bias set to zero (ReLU(0) = 0 feeds zeros onward)."""
    ref = copy.deepcopy(model)
    first, second = ref.classifier[0], ref.classifier[3]
    mask = torch.zeros_like(second.weight, dtype=torch.bool)
    for out_p, in_p in zip(_parts(second.out_features, P), _parts(first.out_features, P)):
        mask[out_p[:, None], in_p[None, :]] = True
    second.weight.mul_(mask)
    for name in FC:
        layer = ref.get_submodule(name)
        gone = np.setdiff1d(np.arange(layer.out_features), np.concatenate(kept[name]))
        layer.weight[gone] = 0
        layer.bias[gone] = 0
    return ref


def test_partitioned_linear_is_its_dense_block_matrix_in_parallel_and_in_sequence() -> None:
    torch.manual_seed(1)
    layer = PartitionedLinear(10, [[0, 10], [2, 5], [6, 4]], [3, 2, 4])
    dense = np.zeros((9, 10))
    rows = np.cumsum([0, 3, 2, 4])
    for p, (start, length) in enumerate(layer.in_ranges):
        dense[rows[p]:rows[p + 1], start:start + length] = layer.blocks[p].weight.detach().numpy()
    bias = np.concatenate([b.bias.detach().numpy() for b in layer.blocks])
    x = torch.randn(4, 10)
    want = x.numpy() @ dense.T + bias
    threads = set()
    hooks = [b.register_forward_hook(lambda m, a, o: threads.add(threading.get_ident())) for b in layer.blocks]
    with torch.no_grad():
        par = layer(x)
    for h in hooks:
        h.remove()
    layer.parallel = False
    seq = layer(x)
    np.testing.assert_allclose(par.numpy(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(par, seq)
    assert threading.get_ident() not in threads  # the blocks ran on the worker threads
    with pytest.raises(ValueError, match="block 1 reads"):
        PartitionedLinear(4, [[0, 4], [3, 2]], [1, 1])


def test_one_partition_with_nothing_pruned_is_the_original() -> None:
    model = _net()
    res = _run(model, 1, ratio=0.0)
    assert all(isinstance(res.model.get_submodule(n), PartitionedLinear) for n in FC)
    assert res.info["skipped"]["classifier.6"].startswith("its output units cannot be removed")
    torch.testing.assert_close(res.model(X), model(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("P,ratio", [(2, 0.0), (2, 0.3), (4, 0.25)])
def test_partitioned_network_is_the_original_with_pruned_weights_zeroed(P: int, ratio: float) -> None:
    model = _net()
    res = _run(model, P, ratio=ratio)
    kept = {n: res.info["layers"][n]["kept"] for n in FC}
    torch.testing.assert_close(res.model(X), _zeroed(model, P, kept)(X), rtol=1e-5, atol=1e-5)
    assert res.info["layers"]["classifier.3"]["reads"] == "classifier.0"
    assert res.info["traffic"]["after"]["classifier.3"] == 0 < res.info["traffic"]["before"]["classifier.3"]


def test_partitions_are_balanced_and_keep_the_strongest_units_by_hand() -> None:
    """Width 250 in 4 partitions (63, 63, 62, 62): every partition keeps the same count, the
    units with the largest L2 norm of the weights left after the cross-partition cut."""
    model = _net(hidden=250)
    P, ratio = 4, 0.4
    res = _run(model, P, ratio=ratio)
    n = 62 - round(ratio * 62)
    first, second, head = (model.classifier[i] for i in (0, 3, 6))
    w2 = second.weight.detach().numpy().copy()
    mask = np.zeros_like(w2, dtype=bool)
    for out_p, in_p in zip(_parts(250, P), _parts(250, P)):
        mask[np.ix_(out_p, in_p)] = True
    w2 *= mask
    score = {"classifier.0": (first.weight.detach().numpy() ** 2).sum(1) + first.bias.detach().numpy() ** 2
             + (w2 ** 2).sum(0),
             "classifier.3": (w2 ** 2).sum(1) + second.bias.detach().numpy() ** 2
             + (head.weight.detach().numpy() ** 2).sum(0)}
    for name in FC:
        got = res.info["layers"][name]["kept"]
        assert [len(k) for k in got] == [n] * P
        want = [sorted(p[np.argsort(-score[name][p], kind="stable")[:n]].tolist()) for p in _parts(250, P)]
        assert got == want
        assert [b.out_features for b in res.model.get_submodule(name).blocks] == [n] * P


def test_parallel_and_sequential_execution_give_identical_outputs() -> None:
    res = _run(_net(), 4, ratio=0.5)
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        par = res.model(x)
        for n in FC:
            res.model.get_submodule(n).parallel = False
        seq = res.model(x)
    assert torch.equal(par, seq)


@pytest.mark.parametrize("P,kind,target", [(2, "params", 0.45), (4, "flops", 0.6), (1, "params", 0.3)])
def test_a_target_lands_within_two_percent(P: int, kind: str, target: float) -> None:
    model = _net()
    res = _run(model, P, **{f"target_{kind}": target})
    measure = (lambda m: count_params(m)) if kind == "params" else (lambda m: count_flops(m, X))
    kept = measure(res.model) / measure(model)
    assert target - 0.02 <= kept <= target
    assert res.info["budget"]["within_tolerance"] and abs(res.info["budget"]["kept"] - kept) < 1e-9
    # FLOPs by hand: the convs, the blocks (2 * in * out per row each), the classifier.
    blocks = sum(b.weight.numel() for n in FC for b in res.model.get_submodule(n).blocks)
    convs = sum(2 * c.weight.numel() * hw for c, hw in ((model.features[0], 256), (model.features[3], 64)))
    assert count_flops(res.model, X) == X.shape[0] * (convs + 2 * blocks + 2 * res.model.classifier[6].weight.numel())


def test_save_load_round_trip_and_the_user_model_untouched(tmp_path) -> None:
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = _run(model, 2, ratio=0.4, threads=1)
    assert model.state_dict().keys() == before.keys() and all(torch.equal(v, before[k])
                                                               for k, v in model.state_dict().items())
    assert isinstance(model.classifier[0], nn.Linear)
    pk.save(res.model, res.plan, tmp_path / "p")
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert [s["factory"] for s in plan["steps"] if s["kind"] == "replace"] == ["partitioned_linear"] * 2
    loaded = pk.load(tmp_path / "p", lambda: TinyVGG()).eval()
    assert isinstance(loaded.classifier[3], PartitionedLinear) and loaded.classifier[3].parallel
    torch.testing.assert_close(loaded(X), res.model(X), rtol=0, atol=0)


def test_onnx_export_runs_the_sequential_path_and_matches(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the 'export' extra)")
    from prunekit.export import export_onnx

    res = _run(_net(), 4, ratio=0.5)
    path = tmp_path / "p.onnx"
    figures = export_onnx(res.model, X, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]
    assert figures["match"]
    np.testing.assert_allclose(got, res.model(X).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,needle", [
    ({"partitions": 0}, "partitions=0 must be an integer >= 1"),
    ({"cross": "some"}, "cross='some'"),
    ({"target_latency": 0.5}, "target_latency is not supported"),
    ({"min_params": 10 ** 9}, "no linear layer to partition"),
    ({"target_params": 0.01}, "out of reach"),
    ({"criterion": "nope"}, "criterion 'nope'"),
    ({"ratios": {"classifier.0": 0.5}}, "ratios, group_ratios, global_ranking and allocation are not supported"),
])
def test_bad_options_raise_naming_them(kw: dict, needle: str) -> None:
    args = {"partitions": 2, "min_params": 1000, **kw}
    with pytest.raises(PruningError, match=needle.replace("(", r"\(")):
        methods.get("partition")(_net(), X, **args)


def test_cli_prune_method_partition(tmp_path, capsys) -> None:
    from prunekit.cli.main import main

    src = tmp_path / "tinyvgg.py"
    src.write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        from test_partition import TinyVGG

        def build(**kwargs):
            return TinyVGG()
    """ % str(Path(__file__).parent)))
    out = tmp_path / "run"
    rc = main(["prune", "--model", f"{src}:build", "--trust-code", "--input-shape", "3,3,16,16", "--method",
               "partition", "--partitions", "4", "--ratio", "0.25", "--out", str(out), "--no-latency"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "partition"
    torch.manual_seed(0)  # the CLI builds the model after seeding with the recipe's seed (0)
    api = methods.get("partition")(TinyVGG().eval(), X, partitions=4, ratio=0.25)  # default min_params 65536
    loaded = pk.load(out, trust_code=True).eval()
    assert loaded.classifier[3].partitions == 4 and isinstance(loaded.classifier[0], nn.Linear)
    torch.testing.assert_close(loaded(X), api.model(X), rtol=0, atol=0)
    capsys.readouterr()
    assert main(["prune", "--model", f"{src}:build", "--trust-code", "--input-shape", "1,3,16,16", "--partitions",
                 "2", "--out", str(tmp_path / "o"), "--no-latency"]) == 2
    assert "only --method partition" in capsys.readouterr().err
