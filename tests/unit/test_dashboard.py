"""The demo's live dashboard maths and plots, fed by a real Metrics registry's exposition."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from adpulse import dashboard as d
from adpulse import plots
from adpulse.core.metrics import Metrics


def test_quantile_interpolates_like_prometheus_histogram_quantile() -> None:
    cum = [(0.001, 0.0), (0.002, 50.0), (0.005, 100.0), (math.inf, 100.0)]
    assert d.quantile(0.5, cum) == pytest.approx(0.002)
    assert d.quantile(0.25, cum) == pytest.approx(0.0015)
    assert d.quantile(0.75, cum) == pytest.approx(0.0035)
    assert math.isnan(d.quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    # Beyond the last finite bound Prometheus answers that bound.
    assert d.quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == pytest.approx(0.1)


def test_quantile_agrees_with_numpy_on_many_observations() -> None:
    m = Metrics.create()
    rng = np.random.default_rng(7)
    xs = rng.lognormal(np.log(0.004), 0.6, 20_000)
    for x in xs:
        m.decision_latency.observe(float(x))
    scrape = d.parse(m.exposition().decode())
    est = d.quantile(0.5, d.buckets(scrape, "adpulse_decision_latency_seconds"))
    # Interpolation inside a bucket: within that bucket's width of the true median.
    assert abs(est - float(np.median(xs))) < 0.0025


def _scrape(m: Metrics) -> d.Scrape:
    return d.parse(m.exposition().decode())


def test_window_rates_quantiles_and_ctr_by_policy_from_two_scrapes() -> None:
    m = Metrics.create()
    m.events.labels("click", "applied").inc(100)
    m.join_labels.labels("thompson", "clicked").inc(1)
    m.join_labels.labels("thompson", "zero").inc(9)
    old = _scrape(m)
    m.events.labels("click", "applied").inc(500)
    m.events.labels("browse", "duplicate").inc(100)
    m.decisions.labels("greedy", "home").inc(40)
    for _ in range(40):
        m.decision_latency.observe(0.004)
    m.dead_letters.labels("user-events", "schema").inc(3)
    m.join_labels.labels("thompson", "clicked").inc(9)
    m.join_labels.labels("thompson", "zero").inc(81)
    m.join_labels.labels("random", "zero").inc(50)
    new = _scrape(m)
    v = d.window(old, new, 2.0, 10.0)
    assert v.events_s == pytest.approx(300.0)  # bench-ok: synthetic counters
    assert v.decisions_s == pytest.approx(20.0)  # bench-ok: synthetic
    assert v.labels_s == pytest.approx(70.0)  # bench-ok: synthetic
    assert 3.0 <= v.decision_p50_ms <= 5.0  # bench-ok: synthetic
    assert math.isnan(v.freshness_p99_ms)  # nothing observed in the interval; bench-ok
    assert v.dead_letters == {"schema": 3.0}
    assert v.shown == {"thompson": 100.0, "random": 50.0}
    w0 = d.window(old, old, 1.0, 8.0)
    ctr = d.ctr_since([w0, v], 5.0)
    assert ctr["thompson"][0] == pytest.approx(0.1)  # 9 clicks of 90 in the window
    assert ctr["thompson"][3] == 90
    lo, hi = ctr["thompson"][1:3]
    assert lo < 0.1 < hi
    assert ctr["random"][0] == 0.0


def test_render_and_summary_and_plots(tmp_path: Path) -> None:
    m = Metrics.create()
    views = []
    old = _scrape(m)
    for i in range(12):
        m.decisions.labels("greedy", "home").inc(10)
        m.decision_latency.observe(0.002 * (i + 1))
        m.freshness.observe(0.03)
        m.join_labels.labels("greedy", "clicked").inc(1)
        m.join_labels.labels("greedy", "zero").inc(9)
        new = _scrape(m)
        views.append(d.window(old, new, 1.0, float(i)))
        old = new
    console = Console(record=True, width=100)
    console.print(d.render(views, "adpulse demo"))
    text = console.export_text()
    assert "decisions/s" in text
    assert "greedy" in text
    s = d.summary(views)
    assert s["decisions"] == 120
    assert s["ctr_by_policy"]["greedy"]["labels"] == 110  # the first scrape is the baseline
    ctr_png = plots.ctr_over_time(views, tmp_path / "ctr.png", window_s=5)
    lat_png = plots.latency_png(new, tmp_path / "latency.png")
    for png in (ctr_png, lat_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_dashboard_panel_has_a_query_to_draw() -> None:
    ps = plots.panels()
    assert len(ps) >= 10
    assert all(p["title"] and p["targets"] for p in ps)


def test_p99_windows_show_a_slow_stretch_that_a_median_of_1s_windows_hides() -> None:
    m = Metrics.create()
    board = d.Dashboard("unused")
    for second in range(30):
        # Seconds 10-19 hold one slow (0.5 s) decision among ten fast ones.
        for _ in range(10):
            m.decision_latency.observe(0.004)
            m.freshness.observe(0.003)
        if 10 <= second < 20:
            m.decision_latency.observe(0.5)
        scrape = _scrape(m)
        board.marks.append((float(second), d.buckets(scrape, d.DECISION_HIST),
                            d.buckets(scrape, d.FRESHNESS_HIST)))  # fmt: skip
    windows = board.p99_windows(10.0)
    assert [w["end_s"] for w in windows] == [10.0, 20.0]
    fast, slow = windows
    assert fast["decision_p99_ms"] <= 5.0 and slow["decision_p99_ms"] >= 250.0
    assert slow["decisions"] == 109  # marks at 10 and 20: seconds 11-20, nine of them slow
    assert fast["freshness_p99_ms"] <= 5.0
