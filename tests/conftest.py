"""A reference a test compares against (tslearn, transformers, triton) is declared per test or per module with
`@pytest.mark.reference("module")`: when it cannot be imported, only those tests are skipped, and under CI
(the environment variable CI set, as .ci/run and hosted CI runners do) they fail instead, since CI installs
every reference (requirements-dev.txt) and a missing one there means the comparison silently stopped
running."""
from __future__ import annotations

import importlib
import os

import pytest


def require(module: str) -> None:
    """Import `module`; if that fails, skip the calling test, or fail it under CI."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the test reference {module!r} cannot be imported ({e}); "
                        f"install requirements-dev.txt")
        pytest.skip(f"reference {module!r} not installed ({e})")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("reference"):
        for module in mark.args:
            require(module)
