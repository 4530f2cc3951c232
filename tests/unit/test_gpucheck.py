"""The GPU check runs anywhere: without a GPU it reports CPU figures and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adpulse.bench import gpucheck

pytestmark = pytest.mark.long  # a bench smoke (13 s here): make test stays under 10 minutes


def test_gpu_check_writes_its_figures_without_a_gpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gpucheck.main(["--out", str(tmp_path), "--seconds", "0.01", "--repeats", "1"]) == 0
    got = json.loads((tmp_path / "gpucheck.json").read_text())
    assert set(got["rows_per_s"]["cpu"]) == {str(b) for b in gpucheck.BATCHES}
    # each figure stands on timed batches (one a repeat at least); how fast is the bench's business
    assert got["batches_timed"]["cpu"].keys() == got["rows_per_s"]["cpu"].keys()
    assert all(n >= 1 for n in got["batches_timed"]["cpu"].values())
    if "cuda" not in got["used"]:
        assert "CPU figures only" in capsys.readouterr().out
