"""HuggingFace ``transformers`` models by name (``hf:NAME``), built from a *config*, never weights.

``NAME`` is one of the configs bundled with prunekit (:func:`hf_config_names`: tiny BERT,
GPT-2, Llama with grouped-query attention, ViT, Swin and SegFormer, 2 layers of width 16-64),
a ``config.json`` file, or a directory holding one (a downloaded model's folder: only its
config is read). The model class is the config's first ``architectures`` entry (its task
head included), else ``AutoModel``; it is built with random weights and ``use_cache=False``
(a key/value cache in the output would pin the attention widths). ``transformers`` is an
optional dependency (``pip install prunekit[hf]``); nothing is ever downloaded.

    model = build_hf_model("llama")                 # LlamaForCausalLM, 4 query heads on 2 kv heads
    x = hf_example_inputs(model)                    # input_ids + attention_mask
    small = pk.prune(model, x, ratio=0.5, ignore=hf_head_modules(model))   # lm_head kept
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.zoo.models import ModelNotFoundError, close_matches

__all__ = ["build_hf_model", "hf_config_names", "hf_default_shape", "hf_example_inputs", "hf_head_modules",
           "is_hf_model", "load_hf_config"]

CONFIG_DIR = Path(__file__).with_name("hf_configs")
"""Where the bundled configs live (``NAME.json``)."""

_TEXT_LENGTH = 16  # tokens of the default example input
_IMAGE_SIZE = 64  # pixels of the default example image when the config names no image_size


def hf_config_names() -> list[str]:
    """Names of the bundled configs (``hf:NAME``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_hf_config(name: str) -> tuple[dict[str, Any], Path]:
    """``(config dict, its file)`` for ``hf:NAME``: a bundled name, a ``.json`` file or a
    directory with a ``config.json``. Raises FileNotFoundError for a path that holds no
    config, ModelNotFoundError (a KeyError) for an unknown name, ValueError for a file that
    is not a JSON object with a ``model_type``."""
    path = Path(name).expanduser()
    looks_like_path = path.suffix == ".json" or "/" in name or "\\" in name or path.exists()
    if not looks_like_path:
        bundled = CONFIG_DIR / f"{name}.json"
        if not bundled.is_file():
            names = hf_config_names()
            raise ModelNotFoundError(
                f"no bundled HF config {name!r}{close_matches(name, names)} (bundled: {', '.join(names)}); "
                "or pass a path to a config.json or to a directory holding one")
        path = bundled
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"directory {str(path)!r} holds no config.json")
        path = path / "config.json"
    elif not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"config {str(path)!r} is not readable JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"config {str(path)!r} has no 'model_type' (not a transformers config)")
    return config, path


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("hf: models need the optional dependency transformers: pip install 'prunekit[hf]'") from exc
    return transformers


def build_hf_model(name: str, *, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """The randomly initialised transformers model of config ``name`` (see :func:`load_hf_config`),
    in eval mode. ``num_classes`` sets the config's ``num_labels`` (a classification head's
    outputs), ``in_chans`` its ``num_channels``."""
    config, path = load_hf_config(name)
    transformers = _transformers()
    config = dict(config)
    model_type = config.pop("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"config {str(path)!r}: transformers {transformers.__version__} knows no model_type {model_type!r}")
    config["use_cache"] = False
    if num_classes is not None:
        config["num_labels"] = num_classes
    if in_chans is not None:
        config["num_channels"] = in_chans
    cfg = transformers.CONFIG_MAPPING[model_type].from_dict(config)
    arch = (cfg.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    model = cls(cfg) if isinstance(cls, type) and issubclass(cls, nn.Module) else transformers.AutoModel.from_config(cfg)
    return model.eval()


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a transformers model (it has a transformers config)."""
    config = getattr(model, "config", None)
    return isinstance(model, nn.Module) and type(config).__module__.startswith("transformers.")


def _text_input(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", "input_ids") == "input_ids"


def hf_default_shape(model: nn.Module) -> tuple[int, ...]:
    """The example input shape of a transformers model: ``(1, 16)`` tokens for a text model,
    ``(1, channels, size, size)`` pixels (the config's ``image_size``, else 64) for a vision one."""
    cfg = model.config
    if _text_input(model):
        return (1, min(_TEXT_LENGTH, int(getattr(cfg, "max_position_embeddings", _TEXT_LENGTH) or _TEXT_LENGTH)))
    size = getattr(cfg, "image_size", _IMAGE_SIZE) or _IMAGE_SIZE
    size = size[0] if isinstance(size, (list, tuple)) else size
    return (1, int(getattr(cfg, "num_channels", 3) or 3), int(size), int(size))


def hf_example_inputs(model: nn.Module, shape: tuple[int, ...] | None = None, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs of a transformers model, seeded: for a text model ``input_ids`` (random
    tokens of the vocabulary, ``shape`` = (batch, length)) and an all-ones ``attention_mask``;
    for a vision model ``pixel_values`` of ``shape`` (batch, channels, height, width).
    ``shape`` defaults to :func:`hf_default_shape`."""
    shape = tuple(shape) if shape is not None else hf_default_shape(model)
    gen = torch.Generator().manual_seed(seed)
    if _text_input(model):
        if len(shape) != 2:
            raise ValueError(f"a text model takes token ids of shape (batch, length), got input shape {shape}")
        vocab = int(getattr(model.config, "vocab_size", 2) or 2)
        ids = torch.randint(0, vocab, shape, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {getattr(model, "main_input_name", "pixel_values"): torch.randn(shape, generator=gen)}


def hf_head_modules(model: nn.Module) -> list[str]:
    """Names of the task head's modules with parameters: the model's top-level children other
    than its base model (``lm_head``, ``classifier``, ``score``, ``decode_head``...); what
    pruning ignores by default. Empty for a base model."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        return []
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]
