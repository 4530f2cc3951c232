"""Abuse rules: the rate limit against a brute-force recount, and the invalid-click rules."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from scoring import joinstate as js
from scoring.abuse import ClickBurst, EventRateLimiter, too_fast
from streams.deadletter import Raw
from streams.ingest import REASONS, decode_events, rate_limit


def brute_force(events: list[tuple[str, int]], limit: int) -> list[bool]:
    """Admit an event while its (user, second) has fewer than ``limit`` admitted before it."""
    seen: Counter[tuple[str, int]] = Counter()
    out = []
    for user, ts in events:
        key = (user, ts // 1000)
        seen[key] += 1
        out.append(seen[key] <= limit)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_rate_limit_over_batches_equals_a_recount_of_the_whole_stream(seed: int) -> None:
    rng = random.Random(seed)
    t0 = 1_700_000_000_000
    # Event times move forward with some jitter, as a live stream does.
    stream = [(f"u{rng.randrange(6)}", t0 + i * 7 + rng.randrange(-300, 300)) for i in range(3000)]
    limiter, got, i = EventRateLimiter(limit=5, keep_s=3), [], 0
    while i < len(stream):
        n = rng.randrange(1, 200)
        chunk = stream[i : i + n]
        users = [u for u, _ in chunk]
        got += limiter.admit(users, np.array([t for _, t in chunk], np.int64)).tolist()
        i += n
    assert got == brute_force(stream, 5)
    assert not all(got)  # the limit did bite


def test_rate_limiter_memory_keeps_only_recent_seconds() -> None:
    limiter = EventRateLimiter(limit=1, keep_s=2)
    for s in range(100):
        limiter.admit([f"u{s}"], np.array([s * 1000], np.int64))
    assert {sec for _, sec in limiter.counts} == {97, 98, 99}


def test_rate_limited_events_become_dead_letters_naming_the_pseudonym_only() -> None:
    value = b'{"event_id":"e%d","user_id":"p-1","kind":"browse","item_id":1,"category_id":2,"ts":5}'
    raws = [Raw(value.replace(b"%d", str(i).encode()), b"raw-id", 0, i) for i in range(5)]
    good, _ = decode_events(raws, 10, 8192, 1000)
    kept, bad = rate_limit(good, EventRateLimiter(limit=3))
    assert [raw.offset for _, raw in kept] == [0, 1, 2]
    assert [(r.reason, r.raw.offset) for r in bad] == [("rate_limited", 3), ("rate_limited", 4)]
    assert "p-1" in bad[0].message and "rate_limited" in REASONS


def test_click_bursts_are_flagged_beyond_n_a_minute_out_of_order_too() -> None:
    burst = ClickBurst(max_per_min=3)
    flags = [burst.suspect("bot", t) for t in (0, 1000, 500, 2000, 3000, 61_500, 61_600)]
    # at 61.5 s three clicks are within the minute (not more than 3); at 61.6 s four are
    assert flags == [False, False, False, True, True, False, True]
    assert not burst.suspect("human", 3000)
    assert not ClickBurst(max_per_min=0).suspect("bot", 0)


def test_too_fast_is_strictly_below_the_delay() -> None:
    assert too_fast(1000, 1149, 150) and not too_fast(1000, 1150, 150)


P = js.JoinParams(window_ms=10_000, conversion_ms=0, grace_ms=0, min_click_delay_ms=150)


def test_a_too_fast_click_leaves_the_decision_open_and_it_closes_at_zero() -> None:
    state: dict[str, js.Pending | None] = {}
    js.apply_batch(state, [js.Decision("d1", 0, "p-u", "ad", 1000)], [], P)
    step = js.apply_batch(state, [], [js.Event(5, "p-u", 1010, "d1")], P)
    assert step.labels == [] and step.suspect == [("too_fast", "p-u")]
    closed = js.close_due(state, 11_001, P)
    assert [lab["clicked"] for lab in closed.labels] == [0]


def test_a_later_human_click_still_labels_after_a_too_fast_one() -> None:
    state: dict[str, js.Pending | None] = {}
    js.apply_batch(state, [js.Decision("d1", 0, "p-u", "ad", 1000)], [], P)
    step = js.apply_batch(
        state, [], [js.Event(5, "p-u", 1010, "d1"), js.Event(6, "p-u", 2500, "d1")], P
    )
    assert [lab["clicked"] for lab in step.labels] == [1]
    assert step.labels[0]["click_ts"] == 2500


def test_a_too_fast_click_held_before_its_decision_is_judged_when_it_comes() -> None:
    state: dict[str, js.Pending | None] = {}
    js.apply_batch(state, [], [js.Event(5, "p-u", 1050, "d1")], P)
    step = js.apply_batch(state, [js.Decision("d1", 0, "p-u", "ad", 1000)], [], P)
    assert step.labels == [] and step.suspect == [("too_fast", "p-u")]


def test_a_click_whose_decision_never_comes_is_counted_as_no_impression() -> None:
    state: dict[str, js.Pending | None] = {}
    js.apply_batch(state, [], [js.Event(5, "p-u", 1000, "ghost")], P)
    closed = js.close_due(state, 1000 + P.window_ms + 1, P)
    assert closed.suspect == [("no_impression", "p-u")] and closed.deleted == {"ghost"}
    assert closed.labels == []
