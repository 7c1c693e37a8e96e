"""The examples in public docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["prunekit.api", "prunekit.graph", "prunekit.handlers", "prunekit.gates",
                                    "prunekit.allocate.cost", "prunekit.surgery.factories", "prunekit.surgery.mha", "prunekit.surgery.partitioned",
                                    "prunekit.decompose", "prunekit.methods.ofa"])
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0
