"""Decode and validate ``user-events`` in batches; everything invalid becomes a dead letter.

The user-events Struct is ``schemas.messages.UserEvent`` (streams/validate.py
explains the fast/slow split). On top of the schema, ingest
refuses what the schema cannot know: events stamped outside the accepted
event-time range (too far in the future, or older than the horizon), and
records not keyed by their own user id (streams/validate.py, ``key_problem``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

from schemas.messages import UserEvent
from scoring.abuse import EventRateLimiter
from scoring.features import KIND_INDEX, EventBatch, fingerprint
from streams.deadletter import Raw, Rejected
from streams.validate import ContractDecoder, split_by_key

# Reasons a message is dead-lettered: a metric label, so a fixed, small set.
REASONS = (
    "too_large", "invalid_json", "schema", "future_ts", "too_old", "key_mismatch", "rate_limited",
)  # fmt: skip
DAY_MS = 86_400_000
LOG_APPEND_TIME = 1  # a Kafka record's timestamp_type when the broker stamped it


def broker_ms(timestamp: int, timestamp_type: int, now_ms: int) -> int:
    """A record's broker time: its LogAppendTime if the topic has one, else ``now_ms``.

    A CreateTime timestamp is set by the producer, so it is the client's word, like
    the body's ``ts``; arrival at this worker is the fallback the client cannot move
    (docs/security.md, "Abuse rules").
    """
    return timestamp if timestamp_type == LOG_APPEND_TIME else now_ms


@functools.cache
def event_decoder(max_bytes: int) -> ContractDecoder[UserEvent]:
    return ContractDecoder("user-events", UserEvent, max_bytes)


def decode_events(
    raws: Sequence[Raw], now_ms: int, max_bytes: int, max_skew_ms: int, max_age_days: int = 0
) -> tuple[list[tuple[UserEvent, Raw]], list[Rejected]]:
    """Split a batch into valid events (with their source) and rejected messages.

    The accepted event-time range is ``[now - max_age_days, now + max_skew_ms]``
    (``max_age_days`` 0: no lower bound). Then every event must be keyed by its
    raw user id (``key_mismatch``).
    """
    good, bad = event_decoder(max_bytes).split(raws)
    horizon = now_ms + max_skew_ms
    oldest = now_ms - max_age_days * DAY_MS if max_age_days > 0 else -1
    if any(ev.ts > horizon or ev.ts < oldest for ev, _ in good):
        kept = []
        for ev, raw in good:
            if ev.ts > horizon:
                ahead = ev.ts - now_ms
                why = f"ts {ev.ts} is {ahead} ms in the future (limit {max_skew_ms} ms)"
                bad.append(Rejected(raw, "future_ts", why))
            elif ev.ts < oldest:
                age = (now_ms - ev.ts) // DAY_MS
                why = f"ts {ev.ts} is {age} days old (limit {max_age_days} days)"
                bad.append(Rejected(raw, "too_old", why))
            else:
                kept.append((ev, raw))
        good = kept
    good, mis_keyed = split_by_key(good)
    return good, bad + mis_keyed


def pseudonymise(good: Sequence[tuple[UserEvent, Raw]], pseudonym: Callable[[str], str]) -> None:
    """Replace each event's user id by its pseudonym, in place (adpulse/core/privacy.py)."""
    for ev, _ in good:
        ev.user_id = pseudonym(ev.user_id)


def rate_limit(
    good: list[tuple[UserEvent, Raw]], limiter: EventRateLimiter, now_ms: int
) -> tuple[list[tuple[UserEvent, Raw]], list[Rejected]]:
    """Events within the per-user rate limit, and the rest as ``rate_limited`` rejections.

    Counted by broker time (``Raw.broker_ms``; ``now_ms`` where it is unknown), not
    by the body's ``ts``: a client that spreads its timestamps is still counted at
    the rate it really sends.
    """
    if limiter.limit <= 0 or not good:
        return good, []
    ts = np.fromiter(
        (now_ms if raw.broker_ms < 0 else raw.broker_ms for _, raw in good), np.int64, len(good)
    )
    keep = limiter.admit([ev.user_id for ev, _ in good], ts)
    if keep.all():
        return good, []
    kept, bad = [], []
    for (ev, raw), ok, t in zip(good, keep.tolist(), ts.tolist(), strict=True):
        if ok:
            kept.append((ev, raw))
        else:
            second = t // 1000
            why = (
                f"user {ev.user_id} sent more than {limiter.limit} events in second {second} "
                "of broker time"
            )
            bad.append(Rejected(raw, "rate_limited", why))
    return kept, bad


def to_columns(
    good: Sequence[tuple[UserEvent, Raw]],
) -> tuple[list[str], EventBatch]:
    """Users of the batch (first-seen order) and the batch's columns, indexed into them."""
    index: dict[str, int] = {}
    user = np.fromiter(
        (index.setdefault(ev.user_id, len(index)) for ev, _ in good), np.int64, len(good)
    )
    batch = EventBatch(
        user=user,
        kind=np.fromiter((KIND_INDEX[ev.kind] for ev, _ in good), np.uint8, len(good)),
        item=np.fromiter((ev.item_id for ev, _ in good), np.int64, len(good)),
        category=np.fromiter((ev.category_id for ev, _ in good), np.int64, len(good)),
        ts=np.fromiter((ev.ts for ev, _ in good), np.int64, len(good)),
        fingerprint=np.fromiter((fingerprint(ev.event_id) for ev, _ in good), np.uint64, len(good)),
        offset=np.fromiter((raw.offset for _, raw in good), np.int64, len(good)),
    )
    return list(index), batch
