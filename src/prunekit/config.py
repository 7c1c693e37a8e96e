"""One typed set of pruning options, :class:`PruneConfig`, for :func:`prunekit.prune`,
:func:`prunekit.plan_for`, the methods in :mod:`prunekit.methods`, the CLI and recipes.

A new option is a field here (with its check in ``__post_init__``), its use in the engine and,
for the command line, a recipe field and its mapping in :func:`prunekit.cli.common.prune_options`.

>>> cfg = PruneConfig(ratio=0.3, ignore=["fc"])
>>> cfg.replace(target_flops=0.5).target
('flops', 0.5)
>>> PruneConfig.from_kwargs(ratoi=0.3)
Traceback (most recent call last):
...
prunekit.errors.PruningError: unknown pruning option 'ratoi' (did you mean 'ratio'?); valid: ratio, ...
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prunekit.errors import PruningError

if TYPE_CHECKING:
    from torch import nn

    from prunekit.criteria import Criterion

__all__ = ["PruneConfig", "make_config", "criterion_name", "FIELDS", "TARGETS"]

#: The budget options; at most one may be given, each a fraction kept in (0, 1].
TARGETS: tuple[str, ...] = ("target_flops", "target_params", "target_latency")
ALLOCATIONS: tuple[str, ...] = ("ratio", "knapsack")
#: Backends ``round_to="auto"`` times on (:data:`prunekit.measure.width_table.BACKENDS`).
ROUND_BACKENDS: tuple[str, ...] = ("eager", "onnxruntime")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """The pruning options of :func:`prunekit.prune` (see there for what each one does).

    ``ratio`` is the fraction of channels removed from every group (in [0, 1)), ranked by
    ``criterion`` (a registered name or a callable ``(model, group, **criterion_kwargs) ->
    scores``); ``ratios`` maps module names to their own ratio; ``ignore`` lists modules (names
    or objects) whose output channels stay; ``group_ratios`` maps coupled groups (a group's name as
    :func:`prunekit.trace` prints it, or its index in ``graph.groups``) to their own ratio, over
    ``ratios`` and ``ratio`` (a per-group allocation, as a search such as ``cacp`` produces);
    ``global_ranking`` ranks normalised scores across
    groups (``"raw"``: the scores as they are, for scores on one scale, e.g. learned gates); channel counts stay multiples of ``round_to`` and every group keeps at least
    ``min_channels``; at most ``max_repairs`` groups are kept after failed validation runs. One
    of ``target_flops`` / ``target_params`` / ``target_latency`` (the fraction kept) replaces
    ``ratio``; ``latency_table`` reuses a measured table for ``target_latency``. ``allocation``
    decides how a budget is shared among groups: ``"ratio"`` (a ratio, uniform or by the global
    ranking, bisected to the budget) or ``"knapsack"`` (the channels that save the most of the
    budgeted quantity per importance lost, read from the cost model: see
    :mod:`prunekit.allocate.knapsack`; needs a budget). ``round_to="auto"`` chooses the multiple
    by timing (:mod:`prunekit.allocate.rounding`): on ``round_backend`` (``"eager"``, PyTorch on
    the model's device, or ``"onnxruntime"``) unless ``width_table`` gives the timings (a
    :class:`prunekit.measure.width_table.WidthTable`, or a timer ``(spec, in_channels,
    out_channels) -> ms``).

    Values are checked on construction (:class:`PruningError` naming the option) and
    normalised: ``ignore`` becomes a tuple, ``ratios``/``criterion_kwargs`` are copied into
    plain dicts, and empty ``ignore``/``ratios``/``criterion_kwargs`` become None. The config is
    frozen (:meth:`replace` returns a changed copy); it is hashable only without dict values.
    """

    ratio: float = 0.5
    criterion: str | Criterion = "l2"
    criterion_kwargs: Mapping[str, Any] | None = None
    ignore: tuple[nn.Module | str, ...] | None = None
    ratios: Mapping[str, float] | None = None
    group_ratios: Mapping[str | int, float] | None = None
    global_ranking: bool | str = False
    round_to: int | str = 1
    min_channels: int = 1
    max_repairs: int = 32
    target_flops: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    latency_table: Any = None
    allocation: str = "ratio"
    width_table: Any = None
    round_backend: str = "eager"

    def __post_init__(self) -> None:
        # Imported here: prunekit.allocate imports torch, and recipes and the CLI parser,
        # which import this module, must stay cheap to import.
        from prunekit.allocate import check_ratio

        def put(name: str, value: Any) -> None:  # normalising a frozen instance's own fields
            object.__setattr__(self, name, value)

        put("ratio", check_ratio(self.ratio, "ratio"))
        if not (isinstance(self.criterion, str) or callable(self.criterion)):
            raise PruningError(f"criterion={self.criterion!r}: must be a criterion name or a callable "
                               "(model, group, **criterion_kwargs) -> scores")
        put("criterion_kwargs", _mapping(self.criterion_kwargs, "criterion_kwargs"))
        put("ignore", _ignore(self.ignore))
        ratios = _mapping(self.ratios, "ratios")
        put("ratios", {k: check_ratio(v, f"ratios[{k!r}]") for k, v in ratios.items()} if ratios else None)
        if not (isinstance(self.global_ranking, bool) or self.global_ranking == "raw"):
            raise PruningError(f"global_ranking={self.global_ranking!r}: must be True, False or 'raw'")
        put("group_ratios", _group_ratios(self.group_ratios))
        if self.group_ratios and self.global_ranking:
            raise PruningError("group_ratios: per-group ratios and global_ranking exclude each other "
                               "(a global ranking decides every group's ratio)")
        if isinstance(self.round_to, str) and self.round_to != "auto":
            raise PruningError(f"round_to={self.round_to!r}: must be an integer >= 1 or 'auto'")
        if self.round_to != "auto":
            put("round_to", _count(self.round_to, "round_to", 1, "channel counts are multiples of it"))
        if self.round_backend not in ROUND_BACKENDS:
            raise PruningError(f"round_backend={self.round_backend!r}: must be one of {', '.join(ROUND_BACKENDS)}")
        if self.round_to != "auto" and (self.width_table is not None or self.round_backend != "eager"):
            which = "width_table" if self.width_table is not None else "round_backend"
            raise PruningError(f"{which}: only used with round_to='auto'")
        if self.width_table is not None and not (callable(self.width_table) or hasattr(self.width_table, "estimate")):
            raise PruningError(f"width_table={self.width_table!r}: must be a prunekit.measure.width_table.WidthTable "
                               "or a timer (spec, in_channels, out_channels) -> ms")
        put("min_channels", _count(self.min_channels, "min_channels", 1, "a group cannot lose all its channels"))
        put("max_repairs", _count(self.max_repairs, "max_repairs", 0, "the number of groups validation may keep"))
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) > 1:
            raise PruningError(f"give one budget, not {', '.join(given)}")
        for key in given:
            put(key, _fraction_kept(getattr(self, key), key))
        if self.latency_table is not None and self.target_latency is None:
            raise PruningError("latency_table: only used with target_latency")
        if self.allocation not in ALLOCATIONS:
            raise PruningError(f"allocation={self.allocation!r}: must be one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "knapsack" and not given:
            raise PruningError("allocation='knapsack' needs a budget: target_flops, target_params or target_latency")
        if self.allocation == "knapsack" and self.group_ratios:
            raise PruningError("group_ratios: not with allocation='knapsack' (the knapsack decides every group's width)")

    @classmethod
    def from_kwargs(cls, **options: Any) -> PruneConfig:
        """The config of the given options (the others at their defaults); an unknown key
        raises :class:`PruningError` naming it and listing the valid ones."""
        _check_keys(options)
        return cls(**options)

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with ``changes`` applied and checked again (unknown keys as in :meth:`from_kwargs`)."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    @property
    def target(self) -> tuple[str, float] | None:
        """The budget as ``(kind, fraction kept)``, kind one of ``flops``/``params``/``latency``;
        None when pruning by ``ratio``."""
        for key in TARGETS:
            value = getattr(self, key)
            if value is not None:
                return key.removeprefix("target_"), value
        return None

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dict (field order kept) for reports and recipes:
        callables show as their name, modules and other objects as ``<TypeName>``."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


#: Names of the options, in field order.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PruneConfig))


def make_config(config: PruneConfig | None = None, **options: Any) -> PruneConfig:
    """The config of a call that takes ``config`` and/or option keywords: the keywords
    override the fields of ``config`` (defaults when ``config`` is None). Returns the
    combined, checked config; raises :class:`PruningError` for a ``config`` that is not a
    :class:`PruneConfig` and for unknown or invalid options."""
    if config is None:
        return PruneConfig.from_kwargs(**options)
    if not isinstance(config, PruneConfig):
        raise PruningError(f"config: expected a PruneConfig, got {type(config).__name__}")
    return config.replace(**options) if options else config


def criterion_name(criterion: Any) -> str:
    """How reports name a criterion: its registered name, else the callable's ``__name__``."""
    return criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom")


def _check_keys(options: Mapping[str, Any]) -> None:
    unknown = [k for k in options if k not in FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PruningError(f"unknown pruning option{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(repr(k) for k in unknown)}{hint}; valid: {', '.join(FIELDS)}")


def _mapping(value: Any, option: str) -> dict[Any, Any] | None:
    """A copy of a mapping option, so later changes to the caller's dict do not reach the
    frozen config; None when empty."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise PruningError(f"{option}={value!r}: must be a mapping")
    return dict(value) or None


def _group_ratios(value: Any) -> dict[str | int, float] | None:
    """``group_ratios`` as a plain dict with checked keys (a group name or index) and ratios;
    None when empty. The keys are matched to the traced groups when pruning."""
    from prunekit.allocate import check_ratio

    mapping = _mapping(value, "group_ratios")
    if not mapping:
        return None
    for key in mapping:
        if isinstance(key, bool) or not isinstance(key, (str, numbers.Integral)) or (
                isinstance(key, numbers.Integral) and key < 0):
            raise PruningError(f"group_ratios: key {key!r} must be a group name or a group index >= 0")
    return {(k if isinstance(k, str) else int(k)): check_ratio(v, f"group_ratios[{k!r}]") for k, v in mapping.items()}


def _ignore(value: Any) -> tuple[Any, ...] | None:
    """``ignore`` as a tuple (one name alone is one module, not its characters); None when empty."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise PruningError(f"ignore={value!r}: must be a list of module names or modules")
    return tuple(value) or None


def _count(value: Any, option: str, least: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PruningError(f"{option}={value!r}: must be an integer >= {least}")
    if value < least:
        raise PruningError(f"{option}={value!r}: must be >= {least} ({why})")
    return int(value)


def _fraction_kept(value: Any, option: str) -> float:
    kind = option.removeprefix("target_")
    try:
        target = float(value)
    except (TypeError, ValueError):
        raise PruningError(f"{option}={value!r}: must be a number in (0, 1]") from None
    if not 0.0 < target <= 1.0:  # also rejects NaN
        raise PruningError(f"{option}={value!r}: must be in (0, 1] (the fraction of {kind} kept)")
    return target


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return f"<{type(value).__name__}>"
