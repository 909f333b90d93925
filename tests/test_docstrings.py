"""The runnable examples in public docstrings run as written."""

import doctest
import importlib

import pytest

MODULES = ["pasa.attention", "pasa.integrations.diffusers.api"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name.startswith("pasa.integrations"):
        pytest.importorskip("diffusers")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
