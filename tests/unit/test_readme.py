"""The README is the user's manual: its configuration table must match the code."""

from __future__ import annotations

from pathlib import Path

from adpulse.metrics import documented_metrics
from adpulse.settings import documented

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_lists_every_setting_with_its_default() -> None:
    text = README.read_text()
    for var, default, doc in documented():
        assert f"| `{var}` | `{default}` | {doc} |" in text, f"README row for {var} is stale"


def test_readme_metric_table_lists_every_metric_the_worker_exports() -> None:
    text = README.read_text()
    for name, kind, labels, doc in documented_metrics():
        row = f"| `{name}` | {kind} | {labels} | {doc} |"
        assert row in text, f"README metric row for {name} is stale"
