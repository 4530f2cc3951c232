"""Abuse rules, pure: a per-user event-rate limit and the invalid-click rules.

Every rule counts by *broker time*, never by the client's ``ts``: the record's
LogAppendTime where the topic has one (``adpulse topics create`` and the worker
create ``user-events`` so), else the time the worker fetched it
(streams/ingest.py, ``broker_ms``). A client that spreads its timestamps over
the past is thus still counted at the rate it really sends.

Ingest (streams/interest.py) keeps at most ``limit`` events per user per second
of broker time; the rest are dead-lettered (``rate_limited``). The click join
(streams/join.py, scoring/joinstate.py) labels a decision clicked only for a
click that passes every rule:

``no_impression``
    a click whose decision never arrives (it is held as an orphan for the
    attribution window, since the two topics are not ordered, then dropped);
``too_fast``
    a click reaching the broker sooner than ``min_delay_ms`` after its decision
    was made (both server clocks): no person reads an ad and clicks it that
    fast (simple visual reaction time alone is ~200 ms);
``burst``
    a user's click beyond ``max_per_min`` within the last 60 s of broker time.

A suspect click never labels its decision; the decision stays open and is
labelled 0 at the end of its window unless a later click passes the rules, so
a bot can neither teach the learner that an ad is clicked nor hide an
impression. Both counters live in worker memory: bounded, and empty after a
restart or a rebalance (a defence, not an account): in the second (rate) or the
minute (burst) around a restart a user may get up to twice the limit through,
and records re-read from the last committed offset are counted afresh, so one
refused (dead-lettered) before the restart may be applied after it. Records
applied before are not applied twice: the interest state dedupes them.

>>> limiter = EventRateLimiter(limit=2)
>>> limiter.admit(["a", "a", "a", "b"], np.array([1000, 1500, 1999, 1000])).tolist()
[True, True, False, True]
>>> limiter.admit(["a"], np.array([1100])).tolist()  # same second, next batch
[False]
>>> too_fast(decision_ts=1000, click_ts=1010, min_delay_ms=150)
True
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

RULES = ("no_impression", "too_fast", "burst")
MINUTE_MS = 60_000


class EventRateLimiter:
    """At most ``limit`` events per (user, second of broker time), within and across batches.

    Counts are kept for the newest second seen and the ``keep_s`` before it, so
    memory is bounded by the users active in that span; an event older than that
    (a partition read far behind the others) is limited within its batch only.
    They are kept by second, so the seconds that fall out of the span are dropped
    whole: rebuilding one map of (user, second) once a second held the event loop
    ~7.5 ms at 5,000 events/s (cProfile in the worker, ``bench features``), and
    longer the more users a second has.
    """

    def __init__(self, limit: int, keep_s: int = 3) -> None:
        self.limit = limit
        self.keep_s = keep_s
        self.counts: dict[int, dict[str, int]] = {}  # second -> user -> events
        self.newest_s = -(1 << 62)

    def admit(self, users: Sequence[str], ts_ms: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Keep mask for a batch, in arrival order (the first events of a second win)."""
        n = len(users)
        keep = np.ones(n, dtype=bool)
        if self.limit <= 0 or n == 0:
            return keep
        sec = ts_ms // 1000
        counts, limit = self.counts, self.limit
        for i, (user, s) in enumerate(zip(users, sec.tolist(), strict=True)):
            of_second = counts.get(s)
            if of_second is None:
                of_second = counts[s] = {}
            c = of_second.get(user, 0) + 1
            of_second[user] = c
            if c > limit:
                keep[i] = False
        newest = int(sec.max())
        if newest > self.newest_s:
            self.newest_s = newest
            horizon = newest - self.keep_s
            for old in [s for s in counts if s < horizon]:
                del counts[old]
        return keep


def too_fast(decision_ts: int, click_ts: int, min_delay_ms: int) -> bool:
    """A click sooner after its decision than a person can click."""
    return click_ts - decision_ts < min_delay_ms


class ClickBurst:
    """Per user, the broker times of their clicks in the last minute; flags clicks beyond N.

    Every click counts towards the window, flagged or not: a bot that keeps
    clicking stays flagged. Users whose newest click is older than a minute
    before the newest click seen are dropped, so memory stays bounded.
    """

    def __init__(self, max_per_min: int) -> None:
        self.max_per_min = max_per_min
        self.recent: dict[str, deque[int]] = {}
        self.newest = 0

    def suspect(self, user: str, ts: int) -> bool:
        if self.max_per_min <= 0:
            return False
        q = self.recent.setdefault(user, deque())
        q.append(ts)  # clicks may arrive out of event-time order: count, do not assume order
        if len(q) > 4 * self.max_per_min + 8:
            top = max(q)
            self.recent[user] = q = deque(t for t in q if t > top - MINUTE_MS)
        if ts > self.newest + MINUTE_MS:
            self._prune(ts)
        return sum(1 for t in q if ts - MINUTE_MS < t <= ts) > self.max_per_min

    def _prune(self, ts: int) -> None:
        self.newest = ts
        cut = ts - MINUTE_MS
        self.recent = {u: q for u, q in self.recent.items() if q and max(q) > cut}

    def forget(self, user: str) -> None:
        self.recent.pop(user, None)
