"""``adpulse bench secondary``: a RocksDB secondary instance catching up with a writer.

Run for real at tiny sizes (a spawned primary writing a real RocksDB, this process
reading it as a secondary); what is checked is that every write batch is accounted for
and the figures have their shape, never their speed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from adpulse.bench.secondary import _freshness
from adpulse.cli import main


def test_bench_secondary_smoke_sees_every_batch_the_primary_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "secondary.json"
    assert main(["bench", "secondary", "--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["secondary"]
    (row,) = res["rows"]
    assert row["interval_ms"] == 5.0 and row["batches"] == 100  # 2,000 keys/s x 1 s / 20
    # the secondary catches up once more after the primary has exited: it sees the last batch
    assert row["unseen_batches"] == 0 and row["catch_ups"] > 0
    for key in ("fresh_p50_ms", "fresh_p99_ms", "catch_up_p50_ms", "catch_up_cpu_ms",
                "secondary_core_share", "primary_write_us_per_key"):  # fmt: skip
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0, key
    assert row["fresh_p50_ms"] <= row["fresh_p99_ms"]
    assert capsys.readouterr().out.startswith("secondary: 2,000 keys/s in batches of 20")


def test_a_batch_is_visible_at_the_first_catch_up_that_shows_it_or_a_later_one() -> None:
    written = np.array([0.0, 1.0, 2.0, 3.0])
    # catch-ups at 1.5 (newest seen 1), 2.5 (a stale read: still 1), 4.0 (3)
    fresh, unseen = _freshness(written, [(1.5, 1), (2.5, 1), (4.0, 3)])
    assert fresh.tolist() == [1.5, 0.5, 2.0, 1.0] and unseen == 0
    fresh, unseen = _freshness(written, [(1.5, 1)])
    assert fresh.tolist() == [1.5, 0.5] and unseen == 2
    assert _freshness(written, [])[1] == 4


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--intervals=1,x"], "--intervals takes"), (["--intervals=0"], "--intervals takes"),
     (["--intervals=5,5"], "--intervals names a interval twice"),
     (["--batch=1"], "--rate takes 1 or more"), (["--duration=0"], "--rate takes")],
)  # fmt: skip
def test_bench_secondary_refuses_bad_sizes_in_one_line(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "secondary", *args]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"adpulse: error: {says}") and err.count("\n") == 1
