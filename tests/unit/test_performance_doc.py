"""docs/performance.md's table of record is generated from the committed ``bench all``
JSON: hand edits, or a JSON committed without regenerating the table, fail here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adpulse.bench.report import BEGIN, END, markdown, table_in, with_table
from adpulse.cli import main

ROOT = Path(__file__).resolve().parents[2]
JSON, DOC = ROOT / "docs" / "bench" / "all.json", ROOT / "docs" / "performance.md"


def test_the_performance_table_is_the_generator_output_for_the_committed_json() -> None:
    assert table_in(DOC.read_text()) == markdown(json.loads(JSON.read_text()))


def test_bench_table_into_a_document_replaces_only_its_generated_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "perf.md"
    doc.write_text(f"# Before\n\n{BEGIN}\n| stale |\n{END}\n\nAfter.\n")
    assert main(["bench", "table", "--from", str(JSON), "--into", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Before\n\n") and text.endswith(f"{END}\n\nAfter.\n")
    assert table_in(text) == markdown(json.loads(JSON.read_text()))
    assert with_table(text, table_in(text)) == text  # regenerating changes nothing
    assert main(["bench", "table", "--from", str(JSON)]) == 0
    assert "| benchmark | target | measured | baseline (same run) |" in capsys.readouterr().out


def test_bench_table_without_a_place_for_the_table_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "plain.md"
    doc.write_text("# No markers\n")
    assert main(["bench", "table", "--from", str(JSON), "--into", str(doc)]) == 4
    err = capsys.readouterr().err.strip()
    assert "no generated table" in err and "\n" not in err
    assert doc.read_text() == "# No markers\n"
