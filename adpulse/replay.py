"""Replay real behaviour logs into ``user-events``.

The Taobao UserBehavior log (Zhu et al., KDD 2018) is the real-world traffic we
calibrate and demo on. Its rows are ``user_id,item_id,category_id,behavior_type,
timestamp`` with ``pv|cart|fav|buy`` and Unix seconds; we map them onto the
``user-events`` contract. Event ids are derived from the file's line numbers, so
replaying the same file twice sends the same events again: the worker's dedupe
is what keeps state exact, as it would be for a producer that retries.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from adpulse.core.errors import InputError
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings

TAOBAO_KINDS = {"pv": "browse", "cart": "cart", "fav": "fav", "buy": "purchase"}


@dataclass(frozen=True, slots=True)
class Event:
    """One ``user-events`` message, already validated by the reader."""

    event_id: str
    user_id: str
    kind: str
    item_id: int
    category_id: int
    ts: int

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "event_id": self.event_id,
                "user_id": self.user_id,
                "kind": self.kind,
                "item_id": self.item_id,
                "category_id": self.category_id,
                "ts": self.ts,
            },
            separators=(",", ":"),
        ).encode()


def read_taobao(path: Path) -> list[Event]:
    """All events of a Taobao CSV, or InputError naming the first bad line.

    Reads the whole file before anything is sent so a bad row never leaves a
    half-replayed topic behind.
    """
    if not path.is_file():
        msg = f"{path}: no such file"
        raise InputError(msg)
    events = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            events.append(_taobao_row(path, lineno, line))
    if not events:
        msg = f"{path}: no rows"
        raise InputError(msg)
    return events


def _taobao_row(path: Path, lineno: int, line: str) -> Event:
    cols = line.rstrip("\r\n").split(",")
    if len(cols) != 5:
        msg = f"{path}:{lineno}: expected 5 columns user,item,category,behavior,ts; got {len(cols)}"
        raise InputError(msg)
    user, item, cat, behavior, ts = (c.strip() for c in cols)
    kind = TAOBAO_KINDS.get(behavior)
    if kind is None:
        msg = f"{path}:{lineno}: behavior {behavior!r} is not one of {', '.join(TAOBAO_KINDS)}"
        raise InputError(msg)
    try:
        item_id, category_id, seconds = int(item), int(cat), int(ts)
    except ValueError:
        msg = f"{path}:{lineno}: item, category and timestamp must be integers"
        raise InputError(msg) from None
    if min(item_id, category_id, seconds) < 0 or not user:
        msg = f"{path}:{lineno}: ids and timestamp must be non-negative, user_id non-empty"
        raise InputError(msg)
    return Event(f"taobao-{lineno}", user, kind, item_id, category_id, seconds * 1000)


def rebased(events: list[Event], now_ms: int, speedup: float = 1.0) -> list[Event]:
    """The same events shifted in time so the newest happens ``now_ms``; gaps are kept,
    or divided by ``speedup``.

    The sample is from 2017: with a 24 h half-life its vectors decay to nothing
    by today, so a demo that serves ads now replays it as if it just happened. A
    worker whose time runs fast (the demo's world: a 120 s half-life) needs the gaps
    compressed by the same factor, else the days between a user's events decay
    everything but the last one to zero.

    >>> ev = [Event("a", "u", "browse", 1, 2, 0), Event("b", "u", "browse", 1, 2, 7_200_000)]
    >>> [e.ts for e in rebased(ev, 10_000_000)], [e.ts for e in rebased(ev, 10_000_000, 720)]
    ([2800000, 10000000], [9990000, 10000000])
    """
    newest = max(e.ts for e in events)
    return [
        Event(e.event_id, e.user_id, e.kind, e.item_id, e.category_id,
              now_ms - round((newest - e.ts) / speedup))
        for e in events
    ]  # fmt: skip


def paced(events: list[Event], speed: float) -> Iterator[Event]:
    """Events in event-time order, slept so that they arrive at ``speed`` x real time.

    ``speed == 0`` means as fast as possible, in file order.
    """
    if speed <= 0:
        yield from events
        return
    ordered = sorted(events, key=lambda e: e.ts)
    start_wall, start_ts = time.monotonic(), ordered[0].ts
    for e in ordered:
        due = start_wall + (e.ts - start_ts) / 1000.0 / speed
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield e


def within_limit(events: Iterator[Event] | list[Event], limit: int) -> Iterator[Event | None]:
    """The events, with ``None`` wherever the sender must flush and wait for the next second
    so that no user gets more than ``limit`` events into one second (0: no limit).

    A list is sent in rounds, each user's first ``limit`` events, then their next
    ``limit``, ... (file order within a round): the sample takes 5 rounds, its busiest
    user having 466 events. A paced iterator cannot be reordered: a wait comes when
    one of its users reaches the limit.
    """
    if limit <= 0:
        yield from events
        return
    if isinstance(events, list):
        seen: Counter[str] = Counter()
        rounds: list[list[Event]] = []
        for e in events:
            k = seen[e.user_id] // limit
            seen[e.user_id] += 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(e)
        for k, one in enumerate(rounds):
            if k:
                yield None
            yield from one
        return
    this_second: Counter[str] = Counter()
    for e in events:
        if this_second[e.user_id] >= limit:
            yield None
            this_second.clear()
        this_second[e.user_id] += 1
        yield e


def produce(
    events: Iterator[Event] | list[Event],
    bootstrap: Settings | str,
    topic: str,
    on_sent: Callable[[int], None] | None = None,
) -> int:
    """Send events keyed by user_id; returns how many the broker acknowledged.

    No user gets more than ``ADPULSE_MAX_EVENTS_PER_USER_S`` events into one second
    (:func:`within_limit`): the worker's rate limit counts by broker time
    (LogAppendTime), so a replay at full speed would have a busy user's history
    refused as a flood. At each wait what was sent is flushed, and sending resumes
    just after the next whole second (about 4 s more for the sample at the default 100).
    """
    from kafka import KafkaProducer  # noqa: PLC0415 - slow import, CLI --help stays fast

    limit = (bootstrap if isinstance(bootstrap, Settings) else Settings()).max_events_per_user_s
    producer = KafkaProducer(
        **client_kwargs(bootstrap), linger_ms=5, acks=1, client_id="adpulse-replay"
    )
    futures = []
    try:
        for e in within_limit(events, limit):
            if e is None:
                producer.flush()  # every record sent so far is appended before ...
                time.sleep(math.floor(time.time()) + 1.05 - time.time())  # ... the next second
                continue
            futures.append(producer.send(topic, key=e.user_id.encode(), value=e.to_json()))
            if on_sent is not None and len(futures) % 256 == 0:
                on_sent(256)
        producer.flush()
        if on_sent is not None:
            on_sent(len(futures) % 256)
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close()
    return len(futures)
