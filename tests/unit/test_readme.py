"""The manual must match the code: the configuration table (docs/configuration.md) and the
metric table (docs/operations.md) list every setting and metric with its default and doc."""

from __future__ import annotations

from pathlib import Path

from adpulse.core.metrics import documented_metrics
from adpulse.core.settings import documented

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION, OPERATIONS = ROOT / "docs" / "configuration.md", ROOT / "docs" / "operations.md"


def test_readme_configuration_table_lists_every_setting_with_its_default() -> None:
    text = CONFIGURATION.read_text()
    for var, default, doc in documented():
        assert f"| `{var}` | `{default}` | {doc} |" in text, f"stale row: {var}"


def test_readme_metric_table_lists_every_metric_the_worker_exports() -> None:
    text = OPERATIONS.read_text()
    for name, kind, labels, doc in documented_metrics():
        row = f"| `{name}` | {kind} | {labels} | {doc} |"
        assert row in text, f"docs/operations.md metric row for {name} is stale"
