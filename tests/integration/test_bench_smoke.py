"""Benchmarks run end to end at tiny sizes, so they cannot rot (speed is not asserted here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adpulse.bench import features
from adpulse.cli import main
from adpulse.settings import Settings

pytestmark = pytest.mark.integration


def test_features_bench_smoke_reports_every_key(settings: Settings, taobao: Path) -> None:
    result = features.run(settings, features.FeaturesBench.smoke(taobao), log=lambda _m: None)
    for key in ("events_per_s", "baseline_events_per_s", "ratio", "freshness_p50_ms",
                "freshness_p99_ms", "events"):  # fmt: skip
        assert key in result
    assert result["events"] == 3000
    assert result["baseline_events_per_s"] > 0  # bench-ok: it ran, no speed claim
    assert result["freshness_samples"] == 1000
    assert math.isfinite(result["freshness_p99_ms"])
    assert "features:" in features.result_line(result)


def test_bench_cli_writes_json(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADPULSE_EMBEDDED_BROKER", "true")  # tansu: its workarounds, dev key
    out = tmp_path / "bench.json"
    args = ["bench", "features", "--smoke", "--json", str(out), "--bootstrap", settings.bootstrap]
    assert main(args) == 0
    body = json.loads(out.read_text())
    assert body["features"]["events"] == 3000


def test_decisions_bench_smoke_reports_every_key(settings: Settings) -> None:
    from adpulse.bench import decisions

    result = decisions.run(settings, decisions.DecisionsBench.smoke(), log=lambda _m: None)
    for key in ("offered_per_s", "achieved_per_s", "latency_p50_ms", "latency_p99_ms",
                "latency_p999_ms", "candidates"):  # fmt: skip
        assert key in result
    assert result["lost"] == 0
    assert result["requests"] == 200
    assert math.isfinite(result["latency_p99_ms"])  # bench-ok: it ran, no speed claim


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
    assert {"features", "decisions", "state", "mixed", "rebalance", "scorer"} <= body.keys()
    printed = capsys.readouterr().out
    assert "| benchmark | target | measured | baseline (same run) |" in printed


def test_state_bench_smoke_restores_and_reports(settings: Settings) -> None:
    from adpulse.bench import state

    result = state.run(settings, state.StateBench.smoke(), log=lambda _m: None)
    assert result["users"] == 2000
    assert result["bytes_per_user_on_disk"] > 0
    assert result["worker_rss_bytes"] > 0
    assert math.isfinite(result["restore_s"])


def test_mixed_bench_smoke_offers_both_loads_and_reports_every_key(settings: Settings) -> None:
    from adpulse.bench import mixed

    result = mixed.run(settings, mixed.MixedBench.smoke(), log=lambda _m: None)
    assert result["lost"] == 0
    assert result["requests"] == 60
    assert result["freshness_samples"] == 600  # every offered event became visible in state
    assert result["clicks_per_s"] > 0  # bench-ok: clicks were sent, no speed claim
    for key in ("latency_p99_ms", "latency_p999_ms", "freshness_p99_ms", "worker_cpu_percent",
                "worker_events_per_s", "requests_per_s"):  # fmt: skip
        assert math.isfinite(result[key]), key
    assert result["worker_rss_bytes"] > 0
    assert "mixed:" in mixed.result_line(result)


def test_rebalance_bench_smoke_splits_partitions_and_survivor_restores_state(
    settings: Settings,
) -> None:
    from adpulse.bench import rebalance

    result = rebalance.run(settings, rebalance.RebalanceBench.smoke(), log=lambda _m: None)
    (r,) = result["rounds"]
    assert r["a_partitions"] and r["b_partitions"]
    assert sorted(r["a_partitions"] + r["b_partitions"]) == list(range(settings.partitions))
    assert r["state_equal"]  # a moved user's interest served by the survivor as before
    assert math.isfinite(r["longest_gap_s"])  # bench-ok: it ran, no timing claim
