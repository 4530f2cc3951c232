"""``adpulse bench adtext --smoke`` end to end, so the benchmark cannot rot (no speed asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adpulse.cli import main
from adpulse.core.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.long]


def test_bench_adtext_smoke_serves_every_ad_and_reports_the_baseline(
    settings: Settings, text_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADPULSE_TEXT_MODEL", str(text_model))  # the session's export
    monkeypatch.setenv("ADPULSE_EMBEDDED_BROKER", "true")  # the development pseudonym key
    out = tmp_path / "adtext.json"
    args = ["bench", "adtext", "--smoke", "--json", str(out), "--bootstrap", settings.bootstrap]
    assert main(args) == 0
    r = json.loads(out.read_text())["adtext"]
    assert r["ads"] == 40 and r["missed"] == 0  # every ad with text became servable
    assert math.isfinite(r["servable_p99_s"])  # bench-ok: it ran, no speed claim
    assert (r["texts_timed_batch1"], r["texts_timed_batch64"]) == (8, 32)  # what each rate timed
