"""Turn a model spec string (as given on the command line or in a recipe) into an ``nn.Module``.

Accepted specs:

* ``resnet56``                      a prunekit zoo model (``list_models()``);
* ``torchvision:NAME``              ``torchvision.models.get_model(NAME, weights=None)``;
* ``timm:NAME``                     ``timm.create_model(NAME, pretrained=False)`` (needs timm);
* ``hf:NAME``                       a transformers model built from a config: a bundled name
                                    (``bert``, ``gpt2``, ``llama``, ``vit``, ``swin``, ``segformer``),
                                    a ``config.json`` or a directory holding one (needs
                                    transformers; see :mod:`prunekit.zoo.hf`);
* ``path/to/file.py:build_fn``      ``build_fn()`` from a Python file.

Nothing is ever downloaded: weights come from a local file via ``weights=``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.zoo.models import ModelNotFoundError, close_matches, create_model, is_model, list_models

__all__ = ["resolve_model", "load_weights", "is_file_spec", "SPEC_FORMS"]

#: Human-readable list of the accepted spec forms, used in error messages.
SPEC_FORMS = ("a zoo name (e.g. 'resnet56'), 'torchvision:NAME', 'timm:NAME', 'hf:NAME' (a bundled config name, "
              "a config.json or a directory holding one) or 'path/to/file.py:FUNCTION'")


def resolve_model(
    spec: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> nn.Module:
    """Build the model described by ``spec`` and return it (see the module docstring for forms).

    ``num_classes``/``in_chans`` are forwarded only when given (otherwise each source's
    default applies). ``pretrained=True`` requires ``weights``: hub downloads are not
    possible here, so the weights must be a local state-dict (``torch.save``) or
    ``.safetensors`` file; ``weights`` alone also loads them. Loading is ``strict=True``.

    Raises ``ValueError`` (malformed spec, unknown prefix, unusable builder or options),
    ``ModelNotFoundError`` (a ``KeyError``: unknown model or function), ``FileNotFoundError``
    (missing model or weights file) or ``ImportError`` (timm not installed); each message
    names the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}; expected {SPEC_FORMS}")
    spec = spec.strip()
    source, target = _split_spec(spec)
    if pretrained and weights is None:
        why = (
            "weights cannot be downloaded here (no network access)"
            if source in ("torchvision", "timm", "hf")
            else "weights cannot be downloaded here (zoo and file models have no published weights)"
        )
        raise ValueError(
            f"model spec {spec!r}: pretrained=True but {why}; pass weights='path/to/weights.pt' "
            "(or .safetensors) pointing to a local state dict"
        )

    if source == "zoo":
        model = _from_zoo(spec, num_classes, in_chans)
    elif source == "torchvision":
        model = _from_torchvision(spec, target, num_classes, in_chans)
    elif source == "timm":
        model = _from_timm(spec, target, num_classes, in_chans)
    elif source == "hf":
        model = _from_hf(spec, target, num_classes, in_chans)
    else:
        model = _from_file(spec, source, target, num_classes, in_chans)

    if weights is not None:
        load_weights(model, weights, spec=spec)
    return model


def is_file_spec(spec: str) -> bool:
    """True when resolving ``spec`` imports and runs a Python file (``path/to/file.py:FUNCTION``).

    Zoo, ``torchvision:``, ``timm:`` and ``hf:`` specs build installed code only (an ``hf:``
    config is data). A malformed spec is not a file spec: :func:`resolve_model` refuses it
    without importing anything."""
    try:
        source, _ = _split_spec(spec.strip())
    except ValueError:
        return False
    return source not in ("zoo", "torchvision", "timm", "hf")


def _split_spec(spec: str) -> tuple[str, str]:
    """Return ``(source, target)``: source is ``zoo``, ``torchvision``, ``timm`` or a file path."""
    # Check the file form first, splitting on the *last* colon, so Windows drive letters
    # ("C:\\nets\\m.py:build") and colons inside directory names still work.
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py"):
        if not tail.isidentifier():
            raise ValueError(f"model spec {spec!r}: {tail!r} is not a valid function name after the file path")
        return head, tail
    if spec.endswith(".py"):
        raise ValueError(f"model spec {spec!r} names a file but no builder; expected 'path/to/file.py:FUNCTION'")
    if ":" not in spec:
        return "zoo", spec
    prefix, _, name = spec.partition(":")
    if prefix not in ("torchvision", "timm", "hf"):
        raise ValueError(f"model spec {spec!r} has unknown prefix {prefix!r}; expected {SPEC_FORMS}")
    if not name:
        raise ValueError(f"model spec {spec!r} has no model name after '{prefix}:'; expected '{prefix}:NAME'")
    return prefix, name


def _from_zoo(spec: str, num_classes: int | None, in_chans: int | None) -> nn.Module:
    """Return ``create_model(spec)`` with the given options, or raise a spec-naming error."""
    if not is_model(spec):
        raise ModelNotFoundError(
            f"model spec {spec!r} is not a prunekit zoo model{close_matches(spec, list_models())} "
            f"(zoo: {', '.join(list_models())}); for other models use {SPEC_FORMS}"
        )
    options = _given(num_classes=num_classes, in_chans=in_chans)
    return create_model(spec, **options)


def _from_torchvision(spec: str, name: str, num_classes: int | None, in_chans: int | None) -> nn.Module:
    """Return ``torchvision.models.get_model(name, weights=None, ...)``."""
    import torchvision  # imported here: torchvision import is slow and rarely needed

    available = torchvision.models.list_models()
    if name.lower() not in available:  # get_model lower-cases the name too
        raise ModelNotFoundError(
            f"model spec {spec!r}: torchvision has no model {name!r}{close_matches(name, available)}"
        )
    if in_chans not in (None, 3):
        # torchvision builders have no in_chans option; silently keeping 3 would fail later.
        raise ValueError(
            f"model spec {spec!r}: torchvision models take 3 input channels, got in_chans={in_chans}; "
            "use 'timm:NAME' or a zoo model for other channel counts"
        )
    return torchvision.models.get_model(name, weights=None, **_given(num_classes=num_classes))


def _from_timm(spec: str, name: str, num_classes: int | None, in_chans: int | None) -> nn.Module:
    """Return ``timm.create_model(name, pretrained=False, ...)``; timm is an optional dependency."""
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f"model spec {spec!r} needs the optional dependency timm: pip install timm") from exc
    if not timm.is_model(name):
        hint = close_matches(name, timm.list_models())
        raise ModelNotFoundError(f"model spec {spec!r}: timm has no model {name!r}{hint}")
    return timm.create_model(name, pretrained=False, **_given(num_classes=num_classes, in_chans=in_chans))


def _from_hf(spec: str, name: str, num_classes: int | None, in_chans: int | None) -> nn.Module:
    """Return the transformers model of config ``name`` (:func:`prunekit.zoo.hf.build_hf_model`);
    errors name the spec."""
    from prunekit.zoo.hf import build_hf_model

    try:
        return build_hf_model(name, num_classes=num_classes, in_chans=in_chans)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"model spec {spec!r}: {exc}") from None
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise type(exc)(f"model spec {spec!r}: {exc}") from None


def _from_file(spec: str, file: str, fn_name: str, num_classes: int | None, in_chans: int | None) -> nn.Module:
    """Load ``file`` as a module, call ``fn_name`` with the options it accepts, return the model."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model spec {spec!r}: file {str(path)!r} does not exist (expected 'path/to/file.py:FUNCTION')"
        )
    module = _load_module(spec, path)
    builder = getattr(module, fn_name, None)
    if builder is None:
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ModelNotFoundError(
            f"model spec {spec!r}: {str(path)!r} defines no {fn_name!r}{close_matches(fn_name, public)}"
        )
    if not callable(builder):
        raise ValueError(
            f"model spec {spec!r}: {fn_name!r} is a {type(builder).__name__}, expected a function returning nn.Module"
        )

    kwargs = _accepted_kwargs(spec, builder, _given(num_classes=num_classes, in_chans=in_chans))
    try:
        model = builder(**kwargs)
    except Exception as exc:
        # Keep the user's traceback (it points at their code) and say which spec failed.
        _add_note(exc, f"raised while building model spec {spec!r}")
        raise
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model spec {spec!r}: {fn_name}() returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def _load_module(spec: str, path: Path) -> Any:
    """Execute the Python file at ``path`` as a fresh module and return it."""
    resolved = path.resolve()
    # A unique, stable module name per file: two different "model.py" files must not clash.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    mod_name = f"_prunekit_user_model_{resolved.stem}_{digest}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if mod_spec is None or mod_spec.loader is None:
        raise ValueError(f"model spec {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    # Registered before exec (as importlib recommends) so dataclasses/pickle inside the file work.
    sys.modules[mod_name] = module
    try:
        mod_spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(mod_name, None)
        if isinstance(exc, Exception):
            _add_note(exc, f"raised while importing the file of model spec {spec!r}")
        raise
    return module


def _accepted_kwargs(spec: str, builder: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """Return the subset of ``options`` that ``builder`` accepts by keyword; warn about the rest."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # builtins/C callables without a signature
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    keyword_ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {k: v for k, v in options.items() if k in params and params[k].kind in keyword_ok}
    dropped = sorted(set(options) - set(accepted))
    if dropped:
        warnings.warn(
            f"model spec {spec!r}: builder does not accept {', '.join(dropped)}; ignoring "
            f"{', '.join(f'{k}={options[k]}' for k in dropped)}",
            stacklevel=4,
        )
    return accepted


def _add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` where supported (``add_note`` is Python 3.11+)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def _given(**options: Any) -> dict[str, Any]:
    """Return the options that are not ``None`` (so each source keeps its own defaults)."""
    return {k: v for k, v in options.items() if v is not None}


def load_weights(model: nn.Module, weights: str | Path, *, spec: str = "") -> nn.Module:
    """Load a local state dict (``torch.save`` file or ``.safetensors``) into ``model`` strictly.

    A checkpoint dict holding the weights under ``state_dict``/``model_state_dict``/``model``
    is unwrapped. Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` (one
    line: missing/unexpected/mis-shaped keys) if it does not match. Returns ``model``.
    """
    label = f"model spec {spec!r}: " if spec else ""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{label}weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a truncated/garbage file
            raise ValueError(f"{label}weights file {str(path)!r}: not a readable safetensors file "
                             f"({type(exc).__name__})") from None
    else:
        from prunekit.recover.checkpoint import load_tensor_file

        try:  # tensors only: a state dict needs no pickled code, and arbitrary pickles are unsafe
            state = load_tensor_file(path)
        except ValueError as exc:
            raise ValueError(f"{label}weights file {exc}") from None
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise ValueError(f"{label}weights file {str(path)!r} holds a {type(state).__name__}, expected a state dict")

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{name} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
            for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if items
        ]
        raise ValueError(f"{label}weights file {str(path)!r} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model
