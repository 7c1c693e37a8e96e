"""Recipes: packaged files are valid, unknown keys and bad types are rejected, precedence is flag > recipe > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunekit.recipe import DEFAULTS, Recipe, RecipeError, builtin_recipes, dump_recipe, load_recipe, resolve

CIFAR = ("resnet20_cifar10", "resnet56_cifar10", "vgg16_cifar10", "mobilenetv2_cifar10")


@pytest.mark.parametrize("name", CIFAR)
def test_packaged_cifar_recipes_are_complete(name: str) -> None:
    r = load_recipe(name)
    for key in ("model", "data", "epochs", "lr", "batch_size", "schedule", "target_flops", "criterion",
                "finetune_epochs", "finetune_lr"):
        assert key in r, f"{name} lacks {key}"
    assert r["data"] == "cifar10:PATH"
    from prunekit.zoo import is_model

    assert is_model(r["model"])
    resolve({}, r)  # values are in range


def test_packaged_recipe_list() -> None:
    assert set(CIFAR) | {"digits_demo"} <= set(builtin_recipes())


def test_unknown_key_is_one_line_naming_key_and_file(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("lr: 0.1\nfinetune_epoch: 3\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    msg = str(exc.value)
    assert "\n" not in msg and "'finetune_epoch'" in msg and str(f) in msg and "finetune_epochs" in msg


@pytest.mark.parametrize("text,key", [("epochs: ten\n", "epochs"), ("augment: 1\n", "augment"),
                                      ("lr: true\n", "lr"), ("ignore: [1, 2]\n", "ignore"), ("- a\n", "mapping"),
                                      ("ratios: [layer1]\n", "ratios"), ("milestones: [a]\n", "milestones")])
def test_wrong_types_are_rejected(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError, match=key):
        load_recipe(f)


def test_int_for_float_and_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("lr: 1\ninput_shape: [1, 3, 32, 32]\n")
    assert load_recipe(f) == {"lr": 1.0, "input_shape": "1,3,32,32"}
    f.write_text("")
    assert load_recipe(f) == {}


def test_precedence_flags_then_recipe_then_base_then_defaults() -> None:
    r, where = resolve({"lr": 0.5, "epochs": None}, {"lr": 0.2, "epochs": 7, "ratio": 0.3},
                       recipe_file="f.yaml", base={"epochs": 3, "criterion": "l1"})
    assert (r.lr, r.epochs, r.ratio, r.criterion, r.batch_size) == (0.5, 7, 0.3, "l1", DEFAULTS["batch_size"])
    assert where == {"lr": "--lr", "epochs": "f.yaml", "ratio": "f.yaml", "criterion": "built-in recipe"}


def test_range_errors_name_the_flag_or_the_file() -> None:
    with pytest.raises(RecipeError, match=r"^--target-flops 1\.5"):
        resolve({"target_flops": 1.5})
    with pytest.raises(RecipeError, match=r"ratio 1\.0.*\(from my\.yaml\)"):
        resolve({}, {"ratio": 1.0}, recipe_file="my.yaml")
    with pytest.raises(RecipeError, match="--epochs"):
        resolve({"finetune_epochs": -1}, flag_names={"finetune_epochs": "--epochs"})


def test_dump_round_trips(tmp_path: Path) -> None:
    r = Recipe(model="resnet20", target_flops=0.4, ignore=["fc"], ratios={"layer3": 0.6}, milestones=[2, 4])
    f = tmp_path / "r.yaml"
    f.write_text(dump_recipe(r, "a header\nof two lines"))
    assert Recipe(**load_recipe(f)) == r


def test_demo_defaults_come_from_the_packaged_recipe() -> None:
    from prunekit.cli.common import resolve_recipe
    from prunekit.cli.main import build_parser

    args = build_parser().parse_args(["demo"])
    r = resolve_recipe(args, base=load_recipe("digits_demo"))
    for key, value in load_recipe("digits_demo").items():
        assert getattr(r, key) == value, key
