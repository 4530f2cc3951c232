"""The consumer watchdog's verdicts: progress, idleness and stalls, on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping

import pytest

from streams.runtime import watchdog
from streams.runtime.watchdog import StallWatchdog, check


class FrozenView:
    """A consumer whose positions the test moves by hand; records what the remedy did."""

    def __init__(self, positions: dict[Hashable, int | None], ends: dict[Hashable, int]) -> None:
        self.positions = positions
        self.ends = ends
        self.unstuck: list[dict[Hashable, int]] = []
        self.answers = True

    def partitions(self) -> list[Hashable]:
        return list(self.positions)

    def position(self, tp: Hashable) -> int | None:
        return self.positions[tp]

    async def end_offsets(self, tps: list[Hashable]) -> Mapping[Hashable, int]:
        if not self.answers:
            await asyncio.sleep(3600)
        return {tp: self.ends[tp] for tp in tps}

    async def unstick(self, tps: Mapping[Hashable, int]) -> None:
        self.unstuck.append(dict(tps))


def run(wd: StallWatchdog, view: FrozenView, now: float) -> dict[Hashable, int]:
    return asyncio.run(check(wd, view, clock=lambda: now))


def test_partition_with_lag_and_no_progress_is_stalled_once_the_period_passes() -> None:
    wd, view = StallWatchdog(stall_s=10), FrozenView({"p0": 5, "p1": 7}, {"p0": 9, "p1": 7})
    assert run(wd, view, 0) == {}
    assert run(wd, view, 9.9) == {}
    assert run(wd, view, 10) == {"p0": 5}  # p1 is at its end: idle, not stalled
    assert set(wd.stalled) == {"p0"} and wd.stalls == 1
    assert view.unstuck == [{"p0": 5}]


def test_remedy_repeats_only_after_another_period_and_progress_clears_the_stall() -> None:
    wd, view = StallWatchdog(stall_s=10), FrozenView({"p0": 5}, {"p0": 9})
    run(wd, view, 0)
    run(wd, view, 10)
    assert run(wd, view, 15) == {}  # remedied at 10: not again before 20
    assert run(wd, view, 20) == {"p0": 5}
    assert wd.stalls == 1 and len(view.unstuck) == 2  # one stall, remedied twice
    view.positions["p0"] = 6
    run(wd, view, 21)
    assert not wd.stalled


def test_slow_but_moving_partition_is_never_stalled() -> None:
    wd, view = StallWatchdog(stall_s=10), FrozenView({"p0": 0}, {"p0": 10**9})
    for second in range(0, 100, 5):
        view.positions["p0"] = second  # one record per second against a huge backlog
        assert run(wd, view, float(second)) == {}
    assert wd.stalls == 0


def test_unknown_position_with_records_on_the_broker_is_a_stall() -> None:
    wd, view = StallWatchdog(stall_s=5), FrozenView({"p0": None}, {"p0": 3})
    run(wd, view, 0)
    assert run(wd, view, 5) == {"p0": 0}


def test_a_consumer_that_cannot_answer_end_offsets_is_stalled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watchdog, "END_OFFSETS_TIMEOUT_S", 0.05)
    wd, view = StallWatchdog(stall_s=5), FrozenView({"p0": 4}, {"p0": 4})
    view.answers = False
    run(wd, view, 0)
    assert run(wd, view, 5) == {"p0": 4}


def test_reset_forgets_progress_so_a_rebalance_pause_is_not_a_stall() -> None:
    wd, view = StallWatchdog(stall_s=10), FrozenView({"p0": 5}, {"p0": 9})
    run(wd, view, 0)
    wd.reset(8)
    assert run(wd, view, 12) == {}  # watching began again at 12
    assert run(wd, view, 22) == {"p0": 5}


def test_revoked_partition_leaves_the_stalled_set() -> None:
    wd, view = StallWatchdog(stall_s=1), FrozenView({"p0": 5}, {"p0": 9})
    run(wd, view, 0)
    run(wd, view, 1)
    assert wd.stalled
    del view.positions["p0"]
    run(wd, view, 2)
    assert not wd.stalled
