"""YAML recipes: every option of ``prunekit prune/train/finetune/demo`` in one flat file.

A recipe is a flat YAML mapping whose keys are the fields of :class:`Recipe`, e.g.::

    model: resnet56
    data: cifar10:/data/cifar
    epochs: 200
    lr: 0.1
    target_flops: 0.5
    finetune_epochs: 100

:func:`load_recipe` reads one and rejects unknown keys and wrongly typed values with one line
naming the key and the file. Values are resolved in three layers: command-line flags the user
actually passed, then the recipe, then the built-in defaults (:func:`resolve`). ``--recipe``
also accepts the name of a packaged recipe (``resnet20_cifar10``, ``digits_demo``, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

__all__ = ["Recipe", "RecipeError", "load_recipe", "resolve", "recipe_path", "builtin_recipes", "dump_recipe",
           "RECIPE_DIR"]

#: Directory holding the packaged recipes (``src/prunekit/recipes/*.yaml``).
RECIPE_DIR = Path(__file__).with_name("recipes")


class RecipeError(ValueError):
    """A recipe that cannot be used (unknown key, wrong type, out-of-range value); one-line message."""


@dataclass
class Recipe:
    """All options of the pipeline commands, with their built-in defaults.

    Model/data: ``model`` (zoo name, ``torchvision:NAME``, ``timm:NAME``, ``file.py:fn`` or a
    saved directory), ``data`` (``digits``, ``cifar10:PATH``, ...), ``num_classes``/``in_chans``
    (default: from the data set), ``image_size``, ``input_shape`` (for pruning without data).
    Training: ``epochs``, ``lr``, ``optimizer`` (sgd/adamw), ``momentum``, ``weight_decay``,
    ``schedule`` (cosine/step/constant; ``milestones``/``gamma`` for step), ``nesterov``,
    ``warmup_epochs``, ``label_smoothing``, ``batch_size``, ``eval_batch_size``, ``subset``
    (class-balanced subset), ``augment``, ``seed``, ``workers``, ``tensorboard``, ``amp`` and
    ``channels_last`` (CUDA only), ``grad_clip``. Pruning: ``ratio`` or ``target_flops`` (fraction of
    FLOPs kept; wins over ``ratio``), ``criterion``, ``global_ranking``, ``allocation`` (``ratio`` or
    ``knapsack``), ``round_to`` (an integer, or ``auto``: chosen by timing on ``round_backend``,
    ``eager`` or ``onnxruntime``), ``ignore``,
    ``ratios`` (per-module ratios), ``min_channels``, ``target_params`` / ``target_latency``
    (fractions kept), ``method`` (a :mod:`prunekit.methods` name, e.g. ``channel_pruning``, ``cap``)
    and ``calib_batches`` (calibration batches of the training split for data-driven criteria/methods);
    :func:`prunekit.cli.common.prune_options` maps the pruning keys to a :class:`prunekit.PruneConfig`.
    Fine-tuning: ``finetune_epochs``, ``finetune_lr``, ``kd_alpha``,
    ``kd_temperature`` (distillation weight and temperature when a teacher is used).
    """

    description: str | None = None
    model: str | None = None
    data: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    image_size: int | None = None
    input_shape: str | None = None
    epochs: int = 10
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    nesterov: bool = False
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    batch_size: int = 128
    eval_batch_size: int = 256
    subset: int | None = None
    augment: bool = True
    seed: int = 0
    workers: int = 0
    tensorboard: bool = False
    amp: bool = False
    channels_last: bool = False
    grad_clip: float | None = None
    ratio: float = 0.5
    target_flops: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    criterion: str = "l2"
    method: str | None = None
    calib_batches: int = 8
    global_ranking: bool = False
    allocation: str = "ratio"
    round_to: int | str = 1
    round_backend: str = "eager"
    ignore: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    min_channels: int = 1
    finetune_epochs: int = 5
    finetune_lr: float = 0.01
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as a plain dict (field order kept), ready for YAML."""
        return dataclasses.asdict(self)

    def check(self, where: Mapping[str, str] | None = None) -> Recipe:
        """Validate value ranges; raise :class:`RecipeError` naming the option (and its source).

        ``where`` maps a key to where its value came from (``--target-flops``, ``FILE``) so the
        message points at what the user has to change. Returns ``self``.
        """
        where = where or {}

        def bad(key: str, why: str) -> RecipeError:
            src = where.get(key)
            name = src if src and src.startswith("--") else key
            suffix = f" (from {src})" if src and not src.startswith("--") else ""
            return RecipeError(f"{name} {getattr(self, key)!r}: {why}{suffix}")

        if self.target_flops is not None and not 0.0 < self.target_flops <= 1.0:
            raise bad("target_flops", "must be in (0, 1] (the fraction of FLOPs kept, e.g. 0.5)")
        for key in ("target_params", "target_latency"):
            v = getattr(self, key)
            if v is not None and not 0.0 < v <= 1.0:
                raise bad(key, "must be in (0, 1] (the fraction kept, e.g. 0.5)")
        if not 0.0 <= self.ratio < 1.0:
            raise bad("ratio", "must be in [0, 1) (the fraction of channels removed)")
        if self.allocation not in ("ratio", "knapsack"):
            raise bad("allocation", "must be 'ratio' or 'knapsack'")
        for key in ("epochs", "finetune_epochs", "workers", "seed"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if self.round_to != "auto" and (isinstance(self.round_to, str) or self.round_to < 1):
            raise bad("round_to", "must be an integer >= 1 or 'auto' (the multiple chosen by timing)")
        if self.round_backend not in ("eager", "onnxruntime"):
            raise bad("round_backend", "must be 'eager' or 'onnxruntime'")
        for key in ("batch_size", "eval_batch_size", "min_channels", "calib_batches"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("lr", "finetune_lr", "weight_decay", "warmup_epochs"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        for key in ("subset", "num_classes", "in_chans", "image_size"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise bad(key, "must be >= 1")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise bad("grad_clip", "must be > 0")
        for name, value in self.ratios.items():
            if not 0.0 <= value < 1.0:
                src = where.get("ratios", "ratios")
                raise RecipeError(f"{src if src.startswith('--') else 'ratios'} {name}={value:g}: must be in [0, 1)"
                                  + ("" if src.startswith("--") else f" (from {src})"))
        if self.optimizer.lower() not in ("sgd", "adamw"):
            raise bad("optimizer", "must be 'sgd' or 'adamw'")
        if self.schedule.lower() not in ("cosine", "step", "constant"):
            raise bad("schedule", "must be 'cosine', 'step' or 'constant'")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad("label_smoothing", "must be in [0, 1)")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise bad("kd_alpha", "must be in [0, 1]")
        if self.kd_temperature <= 0:
            raise bad("kd_temperature", "must be > 0")
        return self


_HINTS = typing.get_type_hints(Recipe)
KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Recipe))
DEFAULTS: dict[str, Any] = Recipe().to_dict()


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check ``value`` against the type of field ``key``; ints are accepted for floats."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    if value is None:
        if optional:
            return None
        raise RecipeError(f"{source}: key '{key}' must not be empty (expected {_type_name(base)})")
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in items):
            raise RecipeError(f"{source}: key '{key}' must be a list of {item.__name__}s, got {value!r}")
        return list(items)
    if origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for k, v in value.items())
        if not ok:
            raise RecipeError(f"{source}: key '{key}' must map module names to numbers, got {value!r}")
        return {k: float(v) for k, v in value.items()}
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is str and key == "input_shape" and isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool) != (base is bool) or not isinstance(value, base):
        raise RecipeError(f"{source}: key '{key}' must be {_type_name(base)}, got {value!r}")
    return value


def _type_name(t: Any) -> str:
    """Readable name of a field type for error messages."""
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(t, str(t))


def builtin_recipes() -> list[str]:
    """Names of the packaged recipes (without ``.yaml``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Return the file for ``name_or_path``: an existing path, else a packaged recipe by name.

    Raises ``FileNotFoundError`` (one line listing the packaged recipes) when neither exists.
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_file():
        return path
    packaged = RECIPE_DIR / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise FileNotFoundError(f"recipe {str(name_or_path)!r}: no such file and no packaged recipe of that name "
                            f"(packaged: {', '.join(builtin_recipes())})")


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe file (or packaged recipe name) and return only the keys it sets.

    Raises :class:`RecipeError` with one line naming the file and the offending key for
    unknown keys, wrongly typed values or malformed YAML, and ``FileNotFoundError`` when the
    recipe does not exist.
    """
    import yaml

    file = recipe_path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{file}:{at} invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{file}: a recipe must be a mapping of option: value, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(KEYS)}"
            raise RecipeError(f"{file}: unknown key '{key}'{hint}")
        out[key] = _coerce(key, value, str(file))
    return out


def resolve(flags: Mapping[str, Any], recipe: Mapping[str, Any] | None = None, *,
            recipe_file: str | None = None, flag_names: Mapping[str, str] | None = None,
            base: Mapping[str, Any] | None = None) -> tuple[Recipe, dict[str, str]]:
    """Merge option layers into a checked :class:`Recipe`; return it and where each value came from.

    Precedence: ``flags`` (values that are not None: the flags the user passed), then
    ``recipe`` (from :func:`load_recipe`), then ``base`` (e.g. a packaged recipe the command
    starts from), then the built-in defaults. ``flag_names`` maps keys to their flag spelling
    for messages (default ``--key-with-dashes``).
    """
    values = dict(DEFAULTS)
    where: dict[str, str] = {}
    for layer, label in ((base or {}, "built-in recipe"), (recipe or {}, recipe_file or "recipe")):
        for key, value in layer.items():
            values[key] = value
            where[key] = label
    for key, value in flags.items():
        if key in values and value is not None:
            values[key] = _coerce(key, value, "command line")
            where[key] = (flag_names or {}).get(key, "--" + key.replace("_", "-"))
    return Recipe(**values).check(where), where


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """YAML text of ``recipe`` (loadable again with :func:`load_recipe`), with an optional comment header."""
    import yaml

    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
