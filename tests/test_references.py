"""Under CI every test reference of requirements-dev.txt must import: tests that compare against one are
skipped when it is missing (tests/conftest.py), which outside CI is a convenience and inside CI would hide a
regression."""
import importlib
import os

import pytest

REFERENCES = ["hypothesis", "tslearn.metrics", "transformers", "triton"]


@pytest.mark.skipif(not os.environ.get("CI"), reason="only under CI (the environment variable CI set)")
@pytest.mark.parametrize("module", REFERENCES)
def test_reference_installed_under_ci(module: str) -> None:
    importlib.import_module(module)
