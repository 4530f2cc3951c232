"""Abuse rules: the rate limit against a brute-force recount, and the invalid-click rules."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adpulse.core.privacy import Pseudonymiser
from adpulse.core.settings import Settings
from adpulse.replay import Event, within_limit
from scoring import joinstate as js
from scoring.abuse import ClickBurst, EventRateLimiter, too_fast
from scoring.features import KINDS, decode_states, reference_vectors
from streams.deadletter import Raw, Rejected
from streams.ingest import REASONS, decode_events, rate_limit
from streams.interest import InterestStage
from streams.runtime.topicadmin import plan


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
    assert set(limiter.counts) == {97, 98, 99}


def test_rate_limited_events_become_dead_letters_naming_the_pseudonym_only() -> None:
    value = b'{"event_id":"e%d","user_id":"p-1","kind":"browse","item_id":1,"category_id":2,"ts":5}'
    raws = [Raw(value.replace(b"%d", str(i).encode()), b"p-1", 0, i) for i in range(5)]
    good, _ = decode_events(raws, 10, 8192, 1000)
    kept, bad = rate_limit(good, EventRateLimiter(limit=3), now_ms=10)
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
    assert [lab.clicked for lab in closed.labels] == [0]


def test_a_later_human_click_still_labels_after_a_too_fast_one() -> None:
    state: dict[str, js.Pending | None] = {}
    js.apply_batch(state, [js.Decision("d1", 0, "p-u", "ad", 1000)], [], P)
    step = js.apply_batch(
        state, [], [js.Event(5, "p-u", 1010, "d1"), js.Event(6, "p-u", 2500, "d1")], P
    )
    assert [lab.clicked for lab in step.labels] == [1]
    assert step.labels[0].click_ts == 2500


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


# -- broker time, not the client's ts ---------------------------------------------------------
T0 = 1_700_000_000_000  # broker time of the bursts below
HOUR = 3_600_000


def event_raw(i: int, user: str, ts: int, broker_ms: int, offset: int | None = None) -> Raw:
    body = {"event_id": f"{user}-e{i}", "user_id": user, "kind": ("browse", "cart", "fav")[i % 3],
            "item_id": 100 + i % 7, "category_id": 1 + i % 4, "ts": ts}  # fmt: skip
    return Raw(json.dumps(body).encode(), user.encode(), 0, i if offset is None else offset,
               broker_ms, broker_ms)  # fmt: skip


def interest_stage(limit: int) -> InterestStage:
    s = Settings(max_events_per_user_s=limit, pseudonymise=False)
    return InterestStage(s, pseudonyms=Pseudonymiser(None))


class Table:
    """The interest table as a dict (key, partition) -> bytes, written as the worker does."""

    def __init__(self) -> None:
        self.data: dict[tuple[bytes, int], bytes] = {}

    def load(self, keys: Sequence[bytes], parts: Sequence[int]) -> list[bytes | None]:
        return [self.data.get((k, p)) for k, p in zip(keys, parts, strict=True)]

    def run(self, stage: InterestStage, raws: Sequence[Raw], now_ms: int) -> list[Rejected]:
        result = stage.process(raws, self.load, now_ms)
        for key, part, value in result.writes:
            self.data[(key, part)] = value
        return result.rejected


def test_an_evading_client_spreading_its_timestamps_is_limited_at_its_real_rate() -> None:
    """50 events in one second of broker time (10x the limit of 5), their ts one hour apart:
    by ``ts`` none would be limited; by broker time 45 are."""
    stage, table = interest_stage(limit=5), Table()
    raws = [event_raw(i, "bot", T0 - (i + 1) * HOUR, T0 + 10 * i) for i in range(50)]
    rejected = table.run(stage, raws, now_ms=T0 + 1000)
    assert [r.reason for r in rejected] == ["rate_limited"] * 45
    assert "second 1700000000 of broker time" in rejected[0].message
    state = decode_states([table.data[(b"bot", 0)]], stage.params)[0]
    assert int(state["counts"].sum()) == 5  # the first five of the second


def test_the_same_events_at_an_honest_rate_all_pass() -> None:
    stage, table = interest_stage(limit=5), Table()
    raws = [event_raw(i, "human", T0 - (i + 1) * HOUR, T0 + 1000 * i) for i in range(50)]
    assert table.run(stage, raws, now_ms=T0 + 60_000) == []


def test_without_a_broker_time_the_limiter_counts_by_arrival() -> None:
    """A record whose topic has CreateTime carries no broker time: it counts when it
    arrives (``now_ms``), whatever its ts says."""
    value = b'{"event_id":"e%d","user_id":"u","kind":"browse","item_id":1,"category_id":2,"ts":%d}'
    raws = [Raw(value % (i, T0 - i * HOUR), b"u", 0, i) for i in range(8)]
    good, _ = decode_events(raws, T0, 8192, 1000)
    kept, bad = rate_limit(good, EventRateLimiter(limit=3), now_ms=T0)
    assert len(kept) == 3 and len(bad) == 5


def test_a_click_burst_is_counted_by_broker_time_not_by_ts() -> None:
    """The join passes each click's broker time to ClickBurst: 30 clicks in 3 s of broker
    time are a burst (limit 20 a minute) however far apart their ts are."""
    burst = ClickBurst(max_per_min=20)
    flags = [burst.suspect("bot", T0 + 100 * i) for i in range(30)]
    assert flags == [False] * 20 + [True] * 10


def test_too_fast_counts_from_the_clicks_broker_time() -> None:
    """A click stamped 10 s after its decision by the client, but at the broker 20 ms after
    the decision was made, is too fast; held as an orphan first, too."""
    for orphan in (False, True):
        state: dict[str, js.Pending | None] = {}
        decision = js.Decision("d1", 0, "p-u", "ad", 1000)
        click = js.Event(5, "p-u", 9000, "d1", seen_ts=1020)
        if orphan:
            js.apply_batch(state, [], [click], P)
            step = js.apply_batch(state, [decision], [], P)
        else:
            js.apply_batch(state, [decision], [], P)
            step = js.apply_batch(state, [], [click], P)
        assert step.labels == [] and step.suspect == [("too_fast", "p-u")], orphan


# Light users never send more than LIMIT events in one second of broker time; heavy ones do.
LIMIT = 3
_event = st.tuples(
    st.sampled_from(["light-a", "light-b", "light-c", "heavy-x", "heavy-y"]),
    st.integers(0, 5),  # second of broker time
    st.integers(0, 72 * HOUR),  # event time offset
    st.sampled_from(["browse", "click", "cart", "fav", "purchase"]),
    st.integers(0, 30),  # item
)


@settings(max_examples=60, deadline=None)
@given(
    drawn=st.lists(_event, min_size=1, max_size=120),
    seed=st.integers(0, 10**6),
    cut=st.integers(1, 25),
)
def test_with_the_limiter_on_users_under_the_limit_keep_an_order_independent_state(
    drawn: list[tuple[str, int, int, str, int]], seed: int, cut: int
) -> None:
    """Whatever the arrival order and batching, a user under the limit keeps every event and
    their state equals the order-free reference; over-limit users do not disturb them."""
    per_second: Counter[tuple[str, int]] = Counter()
    events = []
    for i, (user, sec, dt, kind, item) in enumerate(drawn):
        per_second[(user, sec)] += 1
        if user.startswith("light") and per_second[(user, sec)] > LIMIT:
            continue  # keep light users under the limit
        events.append(({"event_id": f"e{i}", "user_id": user, "kind": kind, "item_id": item,
                        "category_id": item % 5, "ts": T0 - 72 * HOUR + dt},
                       T0 + sec * 1000 + i % 1000))  # fmt: skip
    light = [e for e, _ in events if e["user_id"].startswith("light")]
    results = []
    for order in range(2):
        arrival = list(events)
        random.Random(seed + order).shuffle(arrival)
        stage, table = interest_stage(LIMIT), Table()
        raws = [Raw(json.dumps(e).encode(), e["user_id"].encode(), 0, off, b, b)
                for off, (e, b) in enumerate(arrival)]  # fmt: skip
        limited: list[Rejected] = []
        for i in range(0, len(raws), cut):
            limited += table.run(stage, raws[i : i + cut], now_ms=T0 + 10_000)
        assert all(r.raw.key.startswith(b"heavy") for r in limited if r.raw.key)
        results.append({k[0].decode(): v for k, v in table.data.items()})
    stage = interest_stage(LIMIT)
    ref = reference_vectors(light, stage.table, stage.params)
    for got in results:
        for user, (t, v, counts) in ref.items():
            state = decode_states([got[user]], stage.params)[0]
            assert int(state["t_ref"]) == t
            tol = 2e-5 * max(1.0, float(np.abs(v).max()))
            np.testing.assert_allclose(state["vec"], v, rtol=2e-5, atol=tol)
            assert dict(zip(KINDS, (int(c) for c in state["counts"]), strict=True)) == counts


def test_user_events_is_planned_with_broker_timestamps_and_no_other_topic_is() -> None:
    stamped = {t.name for t in plan(Settings()) if t.configs.get("message.timestamp.type")}
    assert stamped == {"user-events"}
    assert next(t for t in plan(Settings()) if t.name == "user-events").configs[
        "message.timestamp.type"
    ] == "LogAppendTime"


def test_replay_sends_no_user_more_than_the_limit_between_two_waits() -> None:
    """``within_limit`` (adpulse/replay.py): every event once, and between two waits (None)
    at most ``limit`` of one user; a list in rounds, so the busiest user sets their number."""
    rng = random.Random(3)
    events = [Event(f"e{i}", f"u{rng.choice([0, 0, 0, 1, 2])}", "browse", 1, 1, i)
              for i in range(466)]  # fmt: skip
    for source in (events, iter(events)):
        out = list(within_limit(source, 100))
        assert sorted(e.event_id for e in out if e) == sorted(e.event_id for e in events)
        window: Counter[str] = Counter()
        for e in out:
            if e is None:
                window.clear()
            else:
                window[e.user_id] += 1
                assert window[e.user_id] <= 100
    busiest = max(Counter(e.user_id for e in events).values())
    assert list(within_limit(events, 100)).count(None) == -(-busiest // 100) - 1
    assert None not in within_limit(events, 0)
