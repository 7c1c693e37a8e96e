"""Tests for the model zoo (registry, CIFAR models) and model-spec resolving.

Oracles are independent of the code under test: parameter counts from the papers (and
hand-derived layer formulas), torchvision's own MobileNetV2, and exception types/messages
fixed by the documented contract.
"""

from __future__ import annotations

import operator
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.zoo import (
    ModelNotFoundError,
    create_model,
    list_models,
    register_model,
    resolve_model,
)
from prunekit.zoo import models as zoo_models

EXPECTED_ZOO = {
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "vgg16_bn_cifar",
    "vgg19_bn_cifar",
    "mobilenetv2_cifar",
    "small_cnn",
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


# ----------------------------------------------------------------------------- registry


def test_registry_lists_every_zoo_model_sorted_and_filters_by_pattern() -> None:
    assert set(list_models()) == EXPECTED_ZOO
    assert list_models() == sorted(list_models())
    assert list_models("resnet*") == ["resnet110", "resnet20", "resnet32", "resnet56"]
    assert list_models("*_cifar") == ["mobilenetv2_cifar", "vgg16_bn_cifar", "vgg19_bn_cifar"]
    assert list_models("nothing*") == []


def test_create_model_unknown_name_raises_keyerror_with_close_matches() -> None:
    with pytest.raises(KeyError) as info:
        create_model("resnet57")
    assert isinstance(info.value, ModelNotFoundError)
    msg = str(info.value)
    assert "resnet57" in msg and "resnet56" in msg
    assert not msg.startswith("'")  # readable one-liner, not KeyError's quoted repr
    with pytest.raises(KeyError, match="vgg16_bn_cifar"):  # prefix of a longer name
        create_model("vgg16")


def test_register_model_uses_function_name_and_rejects_a_different_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo_models, "_REGISTRY", dict(zoo_models._REGISTRY))

    def tiny_net(*, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    assert register_model(tiny_net) is tiny_net
    assert "tiny_net" in list_models()
    out = create_model("tiny_net", num_classes=4)(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4)

    def resnet20(*, num_classes: int = 10, in_chans: int = 3) -> nn.Module:  # clashes with the zoo
        return nn.Identity()

    with pytest.raises(ValueError, match="resnet20"):
        register_model(resnet20)


# ----------------------------------------------------------------------------- every zoo model


@pytest.mark.parametrize("name", sorted(EXPECTED_ZOO))
def test_zoo_model_shapes_channels_classes_and_traceability(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        gray = create_model(name, in_chans=1, num_classes=7).eval()
        assert first_conv(gray).in_channels == 1
        assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 7)  # Fashion-MNIST size

    # Pruning graph tracers need plain modules: no in-place activations, no data-dependent
    # control flow (symbolic tracing would fail on it).
    assert [n for n, m in model.named_modules() if getattr(m, "inplace", False)] == []
    graph = torch.fx.symbolic_trace(model).graph
    assert any(node.op == "call_module" for node in graph.nodes)

    # Train mode too (BatchNorm1d in the VGG head needs a batch > 1, as training has), and
    # every parameter must get a gradient (no dead modules).
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ----------------------------------------------------------------------------- parameter counts


def cifar_resnet_params(depth: int, *, option_b: bool, num_classes: int = 10) -> int:
    """Hand-derived count: 3x3 convs without bias, BN has 2 params/channel, fc with bias."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    in_ch = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += 9 * in_ch * width + 9 * width * width + 4 * width
            if option_b and in_ch != width:
                total += in_ch * width + 2 * width  # 1x1 projection + BN
            in_ch = width
    return total + 64 * num_classes + num_classes


# Published option-A counts (He et al. 2016, Table 6; exact values from the widely used
# akamaster/pytorch_resnet_cifar10 implementation). Option B adds 2,752 at every depth.
PUBLISHED = {20: (0.27e6, 269_722), 32: (0.46e6, 464_154), 56: (0.85e6, 853_018), 110: (1.7e6, 1_727_962)}
MEASURED_OPTION_B = {20: 272_474, 32: 466_906, 56: 855_770, 110: 1_730_714}


@pytest.mark.parametrize("depth", sorted(PUBLISHED))
def test_cifar_resnet_param_counts_match_paper(depth: int) -> None:
    rounded, exact_option_a = PUBLISHED[depth]
    assert cifar_resnet_params(depth, option_b=False) == exact_option_a  # the formula is right
    count = n_params(create_model(f"resnet{depth}"))
    assert count == exact_option_a + 2_752 == cifar_resnet_params(depth, option_b=True)
    assert count == MEASURED_OPTION_B[depth]
    assert abs(count - rounded) / rounded < 0.03


def test_cifar_resnet_uses_projection_shortcuts_only_where_shape_changes() -> None:
    model = create_model("resnet20")
    projections = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert projections == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    assert model.layer2[0].downsample[0].stride == (2, 2)
    shapes: list[torch.Size] = []
    model.layer3.register_forward_hook(lambda m, i, o: shapes.append(o.shape))  # returns None
    model(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 64, 8, 8)]  # 32 -> 32 -> 16 -> 8, as in the paper


def vgg_conv_params(cfg: list[int], in_chans: int = 3) -> int:
    """Bias-free 3x3 convs + BN (2 params/channel)."""
    total, prev = 0, in_chans
    for c in cfg:
        total += 9 * prev * c + 2 * c
        prev = c
    return total


VGG16 = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
VGG19 = [64, 64, 128, 128, 256, 256, 256, 256] + [512] * 8


def test_vgg_param_counts_match_papers() -> None:
    # Li et al. 2017 VGG-16 (512-512-10 head with BN): 1.5e7 in the paper; we measure 14,987,722.
    vgg16 = n_params(create_model("vgg16_bn_cifar"))
    head = 512 * 512 + 512 + 2 * 512 + 512 * 10 + 10
    assert vgg16 == vgg_conv_params(VGG16) + head == 14_987_722
    assert 14.9e6 <= vgg16 <= 15.1e6
    # Network Slimming VGG-19 (single linear head): 20.04M in the paper; we measure 20,035,018.
    vgg19_slim = n_params(create_model("vgg19_bn_cifar", hidden_features=None))
    assert vgg19_slim == vgg_conv_params(VGG19) + 512 * 10 + 10 == 20_035_018
    assert abs(vgg19_slim - 20.04e6) / 20.04e6 < 0.005


@pytest.mark.parametrize("width_mult", [1.0, 0.5])
def test_mobilenetv2_cifar_matches_torchvision_params_but_ends_at_4x4(width_mult: float) -> None:
    import torchvision

    reference = torchvision.models.mobilenet_v2(num_classes=10, width_mult=width_mult)
    model = create_model("mobilenetv2_cifar", width_mult=width_mult)
    assert n_params(model) == n_params(reference)  # 2,236,682 at width 1.0
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)


def test_small_cnn_has_a_residual_add_and_a_small_size() -> None:
    model = create_model("small_cnn", in_chans=1)
    graph = torch.fx.symbolic_trace(model).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(adds) == 1
    assert 50_000 < n_params(model) < 500_000  # 168,170 measured: quick to train on CPU
    with torch.no_grad():
        assert model.eval()(torch.randn(3, 1, 16, 16)).shape == (3, 10)  # upsampled 8x8 digits


# ----------------------------------------------------------------------------- resolve_model


def test_resolve_zoo_name_forwards_options() -> None:
    model = resolve_model("resnet20", num_classes=3, in_chans=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert resolve_model("resnet20").fc.out_features == 10  # zoo default when not given


def test_resolve_torchvision_num_classes_only_when_given() -> None:
    model = resolve_model("torchvision:resnet18", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert resolve_model("torchvision:resnet18").fc.out_features == 1000


def test_resolve_timm() -> None:
    pytest.importorskip("timm")
    model = resolve_model("timm:resnet18", num_classes=5, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 5)


def test_resolve_timm_missing_says_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match="pip install timm") as info:
        resolve_model("timm:resnet18")
    assert "timm:resnet18" in str(info.value)


def write_builders(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "my_models.py"
    path.write_text(
        textwrap.dedent(
            """
            from torch import nn

            def full(num_classes=10, in_chans=3):
                return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(4, num_classes))

            def bare():
                return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))

            def anything(**kwargs):
                return nn.Linear(kwargs.get("in_chans", 3), kwargs.get("num_classes", 10))

            def not_a_model(num_classes=10):
                return "oops"

            NOT_CALLABLE = 3
            """
        )
    )
    return path


def test_resolve_file_spec_passes_only_accepted_options(tmp_path: Path) -> None:
    # A directory with colons checks that the spec is split on the last colon.
    path = write_builders(tmp_path / "dir:with:colons")
    model = resolve_model(f"{path}:full", num_classes=6, in_chans=2)
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 6)
    with pytest.warns(UserWarning, match="num_classes"):
        bare = resolve_model(f"{path}:bare", num_classes=6)
    assert bare(torch.randn(1, 3, 8, 8)).shape == (1, 2)
    assert resolve_model(f"{path}:anything", num_classes=4, in_chans=5).weight.shape == (4, 5)


@pytest.mark.parametrize(
    ("spec", "exc_type", "fragment"),
    [
        ("foo:bar", ValueError, "unknown prefix"),
        ("resnet57", KeyError, "resnet56"),  # close match suggested
        ("torchvision:resnet19", KeyError, "resnet18"),
        ("timm:resnet_nope", KeyError, "timm"),
        ("{dir}/missing.py:build", FileNotFoundError, "does not exist"),
        ("{dir}/my_models.py:ful", KeyError, "full"),
        ("{dir}/my_models.py:not_a_model", ValueError, "nn.Module"),
        ("{dir}/my_models.py:NOT_CALLABLE", ValueError, "expected a function"),
        ("{dir}/my_models.py", ValueError, "file.py:FUNCTION"),
        ("torchvision:", ValueError, "no model name"),
    ],
)
def test_resolve_errors_name_the_spec(tmp_path: Path, spec: str, exc_type: type[Exception], fragment: str) -> None:
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    write_builders(tmp_path)
    spec = spec.format(dir=tmp_path)
    with pytest.raises(exc_type) as info:
        resolve_model(spec)
    assert type(info.value) is not KeyError or isinstance(info.value, ModelNotFoundError)
    msg = str(info.value)
    assert spec in msg and fragment in msg
    assert "\n" not in msg


def test_resolve_rejects_empty_spec_and_torchvision_in_chans() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model("  ")
    with pytest.raises(ValueError, match=re.escape("'torchvision:resnet18'")):
        resolve_model("torchvision:resnet18", in_chans=1)


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18", "resnet20"])
def test_pretrained_without_local_weights_refuses_to_download(spec: str) -> None:
    with pytest.raises(ValueError, match="cannot be downloaded") as info:
        resolve_model(spec, pretrained=True)
    assert spec in str(info.value) and "weights=" in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_with_local_weights_loads_them_strictly(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = resolve_model("torchvision:mobilenet_v3_small", num_classes=10)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_model

        save_model(source, str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)  # checkpoint-style wrapper
    torch.manual_seed(2)
    loaded = resolve_model("torchvision:mobilenet_v3_small", num_classes=10, pretrained=True, weights=path)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_weights_mismatch_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "r20.pt"
    torch.save(create_model("resnet20").state_dict(), path)
    with pytest.raises(ValueError, match="does not match") as info:
        resolve_model("resnet32", weights=path)
    assert "missing" in str(info.value) and "'resnet32'" in str(info.value)
    with pytest.raises(ValueError, match="shape mismatch"):
        resolve_model("resnet20", num_classes=5, weights=path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        resolve_model("resnet20", weights=tmp_path / "nope.pt")
