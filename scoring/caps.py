"""Frequency caps and budgets: what may still be shown today.

A user's cap record counts impressions per ad for one UTC day and resets when
the day changes. Budgets are paced by scoring/strategy/pacing.py, whose record
now holds a campaign's spend (streams/budget.py); ``SpendRecord`` is the older
spend-only record, read once to carry today's spend over. Spend is accounted at
decision time as the expected cost of a cost-per-click impression, bid x
pCTR; a campaign stops once its share is spent, so it can overshoot by at
most the decisions of one batch (spend is read once per batch).

Budgets are split evenly across the topic's partitions: each partition (so
each worker owning it) may spend ``daily_budget / partitions`` of a campaign
per day. Requests are spread over partitions by user id, so the shares fill at
about the same pace, and no cross-worker coordination sits on the hot path.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

DAY_MS = 24 * 3600 * 1000


class CapRecord(msgspec.Struct, array_like=True, gc=False):
    day: int = -1
    shown: dict[str, int] = {}


class SpendRecord(msgspec.Struct, array_like=True, gc=False):
    day: int = -1
    spent: float = 0.0


_cap_decode = msgspec.msgpack.Decoder(CapRecord).decode
_spend_decode = msgspec.msgpack.Decoder(SpendRecord).decode
encode = msgspec.msgpack.encode


def day_of(ts_ms: int) -> int:
    return ts_ms // DAY_MS


def load_cap(raw: bytes | None, day: int) -> CapRecord:
    rec = _cap_decode(raw) if raw else CapRecord()
    return rec if rec.day == day else CapRecord(day=day, shown={})


def load_spend(raw: bytes | None, day: int) -> SpendRecord:
    rec = _spend_decode(raw) if raw else SpendRecord()
    return rec if rec.day == day else SpendRecord(day=day, spent=0.0)


def under_cap(rec: CapRecord, ad_id: str, cap: int) -> bool:
    return rec.shown.get(ad_id, 0) < cap


def under_caps(rec: CapRecord, ad_ids: Sequence[str], cap: int) -> list[bool]:
    """:func:`under_cap` for each ad: the one frequency-cap rule of the decision stage."""
    shown = rec.shown
    if not shown:
        return [True] * len(ad_ids)
    return [shown.get(a, 0) < cap for a in ad_ids]


def any_capped(rec: CapRecord, cap: int) -> bool:
    """Whether any ad has reached ``cap`` today. When none has, every candidate passes
    :func:`under_caps` and a decision need not look up the candidates' ad ids (a Python
    list of ~100 ids per request, most users having few impressions today)."""
    return any(n >= cap for n in rec.shown.values())


def record_impression(rec: CapRecord, ad_id: str) -> None:
    rec.shown[ad_id] = rec.shown.get(ad_id, 0) + 1


def budget_share(daily_budget: float, partitions: int) -> float:
    return daily_budget / max(1, partitions)
