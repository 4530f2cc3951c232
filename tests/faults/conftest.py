"""Every fault test is long (a minute each, some several): ``make test-long`` runs them, and
CI runs it after ``make test`` (``.ci/run``)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.long)
