"""The join's watermark: event time on a backlog, the wall clock only for an idle input."""

from __future__ import annotations

from collections.abc import Callable

from scoring.watermark import Input, Watermarks

IDLE = 1_000
NOW = 1_000_000


def at_end(*inputs: Input) -> Callable[[Input], bool]:
    """``caught_up`` for a partition whose named inputs are read to their end."""
    return lambda inp: inp in inputs


def test_a_backlog_never_moves_the_watermark_by_the_wall_clock() -> None:
    wm = Watermarks(IDLE)
    wm.seen(0, "decisions", NOW - 60_000, NOW)
    wm.seen(0, "events", NOW - 60_000, NOW)
    # Long after the last record, but user-events still has records waiting: event time only.
    assert wm.advance(0, NOW + 600_000, at_end("decisions")) == NOW - 60_000
    wm.seen(0, "events", NOW - 50_000, NOW + 600_000)
    assert wm.advance(0, NOW + 600_000, at_end("decisions")) == NOW - 50_000  # its own time


def test_the_lower_input_holds_the_watermark() -> None:
    wm = Watermarks(IDLE)
    wm.seen(0, "decisions", NOW, NOW)
    assert wm.advance(0, NOW, at_end()) == 0  # no event read yet: a click may be first in line
    wm.seen(0, "events", NOW - 5_000, NOW)
    assert wm.advance(0, NOW, at_end()) == NOW - 5_000
    wm.seen(0, "events", NOW + 2_000, NOW + 2_000)
    assert wm.advance(0, NOW + 2_000, at_end()) == NOW


def test_an_input_read_to_its_end_and_quiet_for_idle_follows_the_wall_clock() -> None:
    wm = Watermarks(IDLE)
    wm.seen(0, "decisions", NOW, NOW)
    wm.seen(0, "events", NOW, NOW)
    assert wm.advance(0, NOW + IDLE - 1, at_end("decisions", "events")) == NOW  # not quiet yet
    assert wm.advance(0, NOW + 5_000, at_end("decisions", "events")) == NOW + 5_000 - IDLE


def test_an_input_never_read_is_idle_only_after_idle_since_it_was_first_watched() -> None:
    wm = Watermarks(IDLE)
    wm.seen(0, "decisions", NOW, NOW)
    both = at_end("decisions", "events")
    assert wm.advance(0, NOW + 500, both) == 0  # events first watched at NOW
    assert wm.advance(0, NOW + 1_500, both) == NOW + 500


def test_the_watermark_never_goes_back_and_the_future_is_capped_at_now() -> None:
    wm = Watermarks(IDLE)
    wm.seen(0, "decisions", NOW + 3_600_000, NOW)  # a clock far ahead
    wm.seen(0, "events", NOW + 3_600_000, NOW)
    assert wm.advance(0, NOW, at_end()) == NOW
    wm.reset_inputs()  # a rebalance: progress is read again, the watermark stays
    wm.seen(0, "events", NOW - 10_000, NOW + 100)
    wm.seen(0, "decisions", NOW - 10_000, NOW + 100)
    assert wm.advance(0, NOW + 100, at_end()) == NOW


def test_a_rebalance_restarts_the_idle_clock() -> None:
    wm = Watermarks(IDLE)
    assert wm.advance(0, NOW, at_end("decisions", "events")) == 0
    wm.reset_inputs()
    assert wm.advance(0, NOW + 5_000, at_end("decisions", "events")) == 0  # watched anew
    assert wm.advance(0, NOW + 6_000, at_end("decisions", "events")) == NOW + 5_000


def test_partitions_are_independent_and_the_read_position_is_kept() -> None:
    wm = Watermarks(IDLE)
    wm.seen(1, "events", NOW, NOW, next_offset=42)
    wm.seen(1, "events", NOW, NOW, next_offset=17)  # a replayed batch: the position stays
    assert wm.next_offset(1, "events") == 42
    assert wm.next_offset(0, "events") is None
    wm.seen(1, "decisions", NOW, NOW)
    assert wm.advance(1, NOW, at_end()) == NOW
    assert wm.advance(0, NOW, at_end()) == 0
