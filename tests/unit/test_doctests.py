"""Docstring examples are executed, so they stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "adpulse.core.settings",
    "adpulse.core.privacy",
    "adpulse.core.kafkaconf",
    "adpulse.replay",
    "scoring.abuse",
    "scoring.watermark",
    "scoring.train",
    "scoring.embeddings",
    "scoring.arrays",
    "scoring.textencoder",
    "scoring.strategy.epsilon",
    "scoring.strategy.uniform",
    "scoring.simulation",
    "adpulse.report",
    "schemas",
    "schemas.messages",
    "scoring.joinstate",
    "scoring.offline",
    "scoring.progressive",
    "scoring.recovery",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
