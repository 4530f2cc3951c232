"""Every benchmark run end to end at tiny sizes through `adpulse bench all`, so none can rot.

One run of the CLI (speed is not asserted here): each section's keys and the
properties a benchmark must hold whatever the speed (nothing lost, every event
seen, partitions split, state restored equal).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adpulse.cli import main
from adpulse.core.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.long]


def test_bench_all_smoke_writes_every_section_and_a_table(
    settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADPULSE_EMBEDDED_BROKER", "true")  # tansu: its workarounds, dev key
    out = tmp_path / "all.json"
    args = ["bench", "all", "--smoke", "--json", str(out), "--bootstrap", settings.bootstrap]
    assert main(args) == 0
    body = json.loads(out.read_text())
    sections = {"features", "decisions", "serve", "state", "mixed", "rebalance", "promises",
                "scorer"}  # fmt: skip
    assert sections <= body.keys()
    printed = capsys.readouterr().out
    assert "| benchmark | target | measured | baseline (same run) |" in printed
    for line in ("features:", "decisions:", "serve:", "state:", "mixed:", "rebalance",
                 "promises:"):  # fmt: skip
        assert line in printed, line

    f = body["features"]
    for key in ("events_per_s", "baseline_events_per_s", "ratio", "freshness_p50_ms",
                "freshness_p99_ms", "events"):  # fmt: skip
        assert key in f
    assert f["events"] == 3000
    assert f["baseline_events_read"] == [3000] * f["repeats"]  # what the baseline rate timed
    assert f["freshness_samples"] == 1000
    assert math.isfinite(f["freshness_p99_ms"])  # bench-ok: it ran

    d = body["decisions"]
    for key in ("offered_per_s", "achieved_per_s", "latency_p50_ms", "latency_p99_ms",
                "latency_p999_ms", "candidates"):  # fmt: skip
        assert key in d
    assert d["lost"] == 0
    assert d["requests"] == 200
    assert math.isfinite(d["latency_p99_ms"])  # bench-ok: it ran, no speed claim

    sv = body["serve"]
    for key in ("offered_per_s", "achieved_per_s", "candidates", "latency_p50_ms",
                "latency_p99_ms", "latency_p999_ms", "with_ingest_latency_p99_ms", "event_rate",
                "freshness_p99_ms", "floor_p99_ms", "in_process_p99_ms"):  # fmt: skip
        assert math.isfinite(sv[key]), key  # bench-ok: it ran, no speed claim
    assert sv["errors"] == 0
    assert sv["alone"]["requests"] == sv["with_ingest"]["requests"] == 200
    assert sv["alone"]["answered"] + sv["alone"]["shed"] == 200  # nothing else lost
    assert sv["freshness_probes"] > 0
    assert "p99_per_minute_ms" not in sv  # only for runs of 2 minutes or more

    s = body["state"]
    assert s["users"] == 2000
    assert s["bytes_per_user_on_disk"] > 0
    assert s["worker_rss_bytes"] > 0
    assert math.isfinite(s["restore_s"])  # bench-ok: it ran

    m = body["mixed"]
    assert m["lost"] == 0
    assert m["requests"] == 60
    assert m["freshness_samples"] == 600  # every offered event became visible in state
    assert m["clicks"] > 0  # clicks were sent (a count, not a rate)
    for key in ("latency_p99_ms", "latency_p999_ms", "freshness_p99_ms", "worker_cpu_percent",
                "worker_events_per_s", "requests_per_s"):  # fmt: skip
        assert math.isfinite(m[key]), key
    assert m["worker_rss_bytes"] > 0

    (r,) = body["rebalance"]["rounds"]
    assert r["a_partitions"] and r["b_partitions"]
    assert sorted(r["a_partitions"] + r["b_partitions"]) == list(range(settings.partitions))
    assert r["state_equal"]  # a moved user's interest served by the survivor as before
    assert math.isfinite(r["longest_gap_s"])  # bench-ok: it ran, no timing claim
