"""The benches' CPU accounting: the hypervisor's steal, read from the real /proc/stat."""

from __future__ import annotations

import math
import os
import sys

import pytest

from adpulse.bench import machine, machine_line
from adpulse.bench.cpu import box_s, sample, steal_pct, usage
from adpulse.demo import format_live

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux
def test_box_seconds_grow_and_steal_is_a_share_of_the_time_between_two_readings() -> None:
    a = box_s()
    sum(i * i for i in range(2_000_000))  # some time on a core between the readings
    b = box_s()
    assert b[0] >= a[0] and b[1] >= a[1] and b[2] >= a[2]
    assert b[1] - a[1] <= b[0] - a[0]  # busy is part of all, steal part of busy
    assert b[2] - a[2] <= b[1] - a[1]
    share = steal_pct(a, b)
    assert math.isnan(share) or 0.0 <= share <= 100.0


def test_steal_is_the_stolen_seconds_over_all_the_seconds_between_the_readings() -> None:
    assert steal_pct((100.0, 50.0, 10.0), (300.0, 200.0, 60.0)) == pytest.approx(25.0)
    assert math.isnan(steal_pct((100.0, 50.0, 10.0), (100.0, 50.0, 10.0)))  # nothing elapsed


@linux
def test_a_bench_phase_reports_the_box_share_stolen_next_to_the_share_busy() -> None:
    a = sample(os.getpid())
    sum(i * i for i in range(2_000_000))
    u = usage(a, sample(os.getpid()), answered=10)
    assert 0.0 <= u["box_steal_pct"] <= u["box_busy_pct"]  # stolen time is counted as busy


@linux
def test_each_machine_block_carries_the_steal_since_the_one_before() -> None:
    machine()  # the mark
    m = machine()
    assert 0.0 <= m["steal_pct"] <= 100.0 or math.isnan(m["steal_pct"])
    assert "stolen by the hypervisor" in machine_line(m) or math.isnan(m["steal_pct"])
    assert "steal_pct" not in machine(steal=False)  # a progress line leaves it to the figures


def test_the_demo_summary_names_the_share_other_guests_took() -> None:
    live = {"seconds": 60, "events": 10, "decisions": 5, "decisions_per_s_median": 1,
            "decision_p99_ms_median": 9.0, "freshness_p99_ms_median": 40.0,
            "dead_letters": {}, "ctr_by_policy": {}, "steal_pct": 31.6}  # fmt: skip
    assert "gave 32% of this box's CPU time to other guests" in format_live(live)
    assert "other guests" not in format_live({**live, "steal_pct": math.nan})
