"""Decisions x clicks -> labels: the per-decision state machine of the join, pure.

One record per decision id (``Pending``, msgpack, ~150 bytes) lives in the
``pending`` table. A decision opens it; the first click inside
``[decision_ts, decision_ts + window]`` labels it 1 at once, unless it is suspect
(sooner than ``min_click_delay_ms``, scoring/abuse.py: counted, the record stays
open); once the partition's event-time watermark passes the window end with no
click, it is labelled 0. A purchase of the ad's item or category within the conversion
window after the click adds a second record with ``converted: 1``. After that
the record stays as an "emitted" marker (late clicks are recognised and
counted, redeliveries change nothing) until its deadline plus a grace period,
then it is deleted, so state is bounded by decision rate x (window + grace).

Exactness without transactions, as in scoring/features.py: each record keeps
the highest ad-decisions and user-events offsets applied to it (the topics are
co-partitioned, so both offsets are of the same partition number); a
redelivered message at or below them is skipped, so replaying a batch changes
nothing and labels nothing.

A decision of a cost-per-click ad carries its price (``click_price``, its bid);
the label that marks it clicked also lists a :class:`Charge` for it, named by
the offset of the message that clicked it, so whoever applies charges can skip
one it already holds when a batch is replayed (streams/budget.py). A decision
of a cost-per-conversion ad (billing cpa) carries ``conversion_price`` instead,
charged the same way by its ``converted: 1`` label, named by the purchase's offset
(one purchase may convert several decisions: their charges share that offset).

>>> p = JoinParams(window_ms=1000, conversion_ms=0, grace_ms=0)
>>> state = {}
>>> out = apply_batch(state, [Decision("d1", 0, "u", "ad", 100)], [], p)
>>> out.labels
[]
>>> close_due(state, 1200, p).labels[0].clicked
0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

import msgspec
import numpy as np

from schemas.messages import UNSET, CtrFeedback, Device, FeatureSnapshot, Flag, UnsetType
from scoring.abuse import too_fast

# Status of a record.
OPEN = 0  # decision seen, no label yet
CLICKED = 1  # clicked=1 emitted; a purchase may still convert it
ZERO = 2  # clicked=0 emitted
CONVERTED = 3  # converted=1 emitted
ORPHAN = 4  # a click came before its decision (the topics are not ordered together)


@dataclass(frozen=True)
class JoinParams:
    window_ms: int = 1_800_000
    conversion_ms: int = 86_400_000
    grace_ms: int = 3_600_000
    min_click_delay_ms: int = 0  # sooner clicks are suspect (scoring/abuse.py)

    @classmethod
    def from_settings(cls, s: Any) -> JoinParams:
        return cls(
            window_ms=int(s.attribution_window_s * 1000),
            conversion_ms=int(s.conversion_window_s * 1000),
            grace_ms=int(s.feedback_grace_s * 1000),
            min_click_delay_ms=int(getattr(s, "min_click_delay_ms", 0)),
        )


class Pending(msgspec.Struct, array_like=True, gc=False):
    """One decision's join state (the ``pending`` table value)."""

    status: int
    user_id: str
    ad_id: str = ""
    decision_ts: int = -1
    propensity: float = 1.0
    policy: str = ""
    pctr: float = 0.0
    model_version: str = ""
    placement: str = ""
    campaign_id: str = ""
    category_id: int = -1
    item_id: int = -1
    arm: str = ""
    click_ts: int = -1
    dec_off: int = -1  # highest ad-decisions offset applied
    ev_off: int = -1  # highest user-events offset applied
    pctr_raw: float = -1.0  # model output before calibration (-1: the decision had none)
    device: str = ""
    interest: bytes = b""  # the decision's interest vector as float16 (2 bytes a number)
    click_price: float = 0.0  # charged when the decision is clicked: its bid if cpc, else 0
    click_seen: int = -1  # an ORPHAN's earliest click in broker time (-1: unknown)
    # Charged when the decision converts: its bid if cpa, else 0. Last, with a default, so
    # records written before it decode as before (msgspec array_like).
    conversion_price: float = 0.0
    pcvr: float = -1.0  # the model's pCVR of the served ad (-1: its model had no CVR head)
    sequence: bytes = b""  # behaviours a sequence model attended over (:func:`pack_sequence`)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Pending).decode


def encode(rec: Pending) -> bytes:
    return _encode(rec)


def decode(value: bytes) -> Pending:
    return _decode(value)


@dataclass(frozen=True)
class Decision:
    decision_id: str
    offset: int
    user_id: str
    ad_id: str
    ts: int
    propensity: float = 1.0
    policy: str = "greedy"
    pctr: float = 0.0
    model_version: str = "unknown"
    placement: str = ""
    campaign_id: str = ""
    category_id: int = -1
    item_id: int = -1
    arm: str = ""
    pctr_raw: float = -1.0
    device: str = ""
    interest: bytes = b""  # float16 bytes (:func:`pack_interest`)
    click_price: float = 0.0  # the bid of a cpc decision, 0 for cpm
    conversion_price: float = 0.0  # the bid of a cpa decision, 0 otherwise
    pcvr: float = -1.0
    sequence: bytes = b""  # (:func:`pack_sequence`)


def pack_interest(vector: Sequence[float]) -> bytes:
    """A snapshot's interest vector, compact for the pending record: float16, little-endian.

    float16 keeps about 3 significant digits: 64 numbers cost 128 bytes instead of ~450
    of JSON, and the pending table holds one per decision for window + grace.
    """
    return np.clip(np.asarray(vector, dtype=np.float64), -65504, 65504).astype("<f2").tobytes()


def unpack_interest(raw: bytes) -> list[float]:
    return [round(x, 4) for x in np.frombuffer(raw, dtype="<f2").astype(np.float64).tolist()]


def pack_sequence(pairs: Sequence[Sequence[int]]) -> bytes:
    """A snapshot's behaviours ([item_id, category_id], newest first) as little-endian int64
    pairs: 16 bytes a behaviour, so what ``adpulse train --sequence`` reads from
    ctr-feedback is what the model attended over."""
    return np.asarray(pairs, dtype="<i8").reshape(-1, 2).tobytes() if len(pairs) else b""


def unpack_sequence(raw: bytes) -> list[tuple[int, int]]:
    return [(a, b) for a, b in np.frombuffer(raw, dtype="<i8").reshape(-1, 2).tolist()]


@dataclass(frozen=True)
class Event:
    """A click on an ad we served (decision_id set) or a purchase (decision_id empty)."""

    offset: int
    user_id: str
    ts: int
    decision_id: str = ""
    item_id: int = -1
    category_id: int = -1
    seen_ts: int = -1  # broker time of the click (too_fast counts by it); -1: use ts


Source = Literal["decisions", "events"]


@dataclass(frozen=True)
class Charge:
    """A click (or conversion) to charge: ``amount`` to ``campaign_id``, caused by the message at
    ``offset`` of ``source`` (both topics have the record's partition number)."""

    decision_id: str
    campaign_id: str
    amount: float
    source: Source
    offset: int


@dataclass
class Step:
    labels: list[CtrFeedback] = field(default_factory=list)  # ctr-feedback records
    changed: set[str] = field(default_factory=set)  # decision ids to write
    deleted: set[str] = field(default_factory=set)  # decision ids to delete (tombstone)
    late_clicks: int = 0
    expired: int = 0
    suspect: list[tuple[str, str]] = field(default_factory=list)  # (rule, user): never labelled
    # one per clicked=1 label of a cpc ad, and per converted=1 label of a cpa ad
    charges: list[Charge] = field(default_factory=list)


def window_end(rec: Pending, p: JoinParams) -> int:
    return rec.decision_ts + p.window_ms


def deadline(rec: Pending, p: JoinParams) -> int:
    """Event time after which the record is due: labelled 0 if OPEN, else deleted."""
    if rec.status == OPEN:
        return window_end(rec, p)
    if rec.status == ORPHAN:
        return rec.click_ts + p.window_ms + p.grace_ms
    end = window_end(rec, p)
    if rec.status == CLICKED:
        end = max(end, rec.click_ts + p.conversion_ms)
    return end + p.grace_ms


def apply_batch(
    state: dict[str, Pending | None],
    decisions: Sequence[Decision],
    events: Sequence[Event],
    p: JoinParams,
) -> Step:
    """Apply one batch (one partition) to ``state`` in place; ``state`` holds every key touched.

    Decisions go first, so a click in the same batch as its decision finds it.
    Purchases match the records of their user's clicked decisions that are in
    ``state`` (the caller loads them from its user index).
    """
    out = Step()
    for d in decisions:
        rec = state.get(d.decision_id)
        if rec is not None and (rec.dec_off >= d.offset or rec.status != ORPHAN):
            continue  # redelivered, or a duplicate decision id
        orphan_click = rec.click_ts if rec is not None else -1
        orphan_seen = rec.click_seen if rec is not None else -1
        rec = Pending(
            OPEN, d.user_id, d.ad_id, d.ts, d.propensity, d.policy, d.pctr, d.model_version,
            d.placement, d.campaign_id, d.category_id, d.item_id, d.arm,
            dec_off=d.offset, ev_off=rec.ev_off if rec is not None else -1,
            pctr_raw=d.pctr_raw, device=d.device, interest=d.interest, click_price=d.click_price,
            conversion_price=d.conversion_price, pcvr=d.pcvr,
            sequence=d.sequence,
        )  # fmt: skip
        state[d.decision_id] = rec
        out.changed.add(d.decision_id)
        if orphan_click >= 0:
            _click(d.decision_id, rec, orphan_click, p, out, ("decisions", d.offset), orphan_seen)
    by_user: dict[str, list[str]] = {}
    for key, rec in state.items():
        if rec is not None and rec.status == CLICKED:
            by_user.setdefault(rec.user_id, []).append(key)
    for ev in events:
        if ev.decision_id:
            rec = state.get(ev.decision_id)
            if rec is None:
                state[ev.decision_id] = Pending(
                    ORPHAN, ev.user_id, click_ts=ev.ts, ev_off=ev.offset, click_seen=ev.seen_ts
                )
                out.changed.add(ev.decision_id)
                continue
            if rec.ev_off >= ev.offset:
                continue
            rec.ev_off = ev.offset
            out.changed.add(ev.decision_id)
            if rec.status == ORPHAN:
                rec.click_ts = min(rec.click_ts, ev.ts)
                if ev.seen_ts >= 0:
                    seen = rec.click_seen
                    rec.click_seen = ev.seen_ts if seen < 0 else min(seen, ev.seen_ts)
            elif _click(ev.decision_id, rec, ev.ts, p, out, ("events", ev.offset), ev.seen_ts):
                by_user.setdefault(rec.user_id, []).append(ev.decision_id)
        else:
            for key in by_user.get(ev.user_id, ()):
                rec = state[key]
                assert rec is not None
                if rec.ev_off >= ev.offset or rec.status != CLICKED:
                    continue
                rec.ev_off = ev.offset
                out.changed.add(key)
                same = ev.item_id == rec.item_id >= 0 or ev.category_id == rec.category_id >= 0
                if same and rec.click_ts <= ev.ts <= rec.click_ts + p.conversion_ms:
                    rec.status = CONVERTED
                    out.labels.append(label(key, rec, 1, rec.click_ts, "conversion", converted=1))
                    if rec.conversion_price > 0:
                        out.charges.append(
                            Charge(key, rec.campaign_id, rec.conversion_price, "events", ev.offset)
                        )
    return out


def _click(
    key: str,
    rec: Pending,
    ts: int,
    p: JoinParams,
    out: Step,
    cause: tuple[Source, int],
    seen: int = -1,
) -> bool:
    """A click on an open or labelled decision; True when it labels it 1 (and charges it,
    if cpc: ``cause`` is the message that clicked it).

    ``too_fast`` compares the click's broker time ``seen`` (-1: unknown, its ``ts``)
    with the decision's time, both server clocks: a client cannot move either.
    """
    if rec.status == OPEN and rec.decision_ts <= ts <= window_end(rec, p):
        if too_fast(rec.decision_ts, ts if seen < 0 else seen, p.min_click_delay_ms):
            out.suspect.append(("too_fast", rec.user_id))  # stays open: 0 unless a real click
            return False
        rec.status, rec.click_ts = CLICKED, ts
        out.labels.append(label(key, rec, 1, ts, "click"))
        if rec.click_price > 0:
            out.charges.append(Charge(key, rec.campaign_id, rec.click_price, *cause))
        return True
    if rec.status in (ZERO, OPEN) and ts >= rec.decision_ts:
        out.late_clicks += 1  # after the label, or stamped after the window: never emitted
    return False


def close_due(state: Mapping[str, Pending | None], watermark: int, p: JoinParams) -> Step:
    """Records whose deadline the watermark has passed: OPEN -> clicked=0, others deleted.

    Labelled records are updated in place; expired ones are listed in ``deleted``.
    """
    out = Step()
    for key, rec in state.items():
        if rec is None or watermark <= deadline(rec, p):
            continue
        if rec.status == OPEN:
            rec.status = ZERO
            out.changed.add(key)
            out.labels.append(label(key, rec, 0, window_end(rec, p), "window_expired"))
        else:
            if rec.status == ORPHAN:  # its decision never came: no impression to click
                out.suspect.append(("no_impression", rec.user_id))
            out.deleted.add(key)
            out.expired += 1
    return out


def label(
    key: str,
    rec: Pending,
    clicked: Flag,
    label_ts: int,
    reason: str,
    converted: Flag | UnsetType = UNSET,
) -> CtrFeedback:
    """The ctr-feedback record (schemas/ctr-feedback.schema.json) for a labelled decision.

    ``features`` is the decision's snapshot: its interest vector (to float16
    precision; empty for a user with no history), and ``features.pctr`` the raw
    model output (what calibration learns from), while the top-level ``pctr``
    is the calibrated one that was served.
    """
    features = FeatureSnapshot(
        interest=unpack_interest(rec.interest),
        placement=rec.placement or UNSET,
        device=cast(Device, rec.device) if rec.device else UNSET,
        hour=datetime.fromtimestamp(rec.decision_ts / 1000, tz=UTC).hour,
        category_id=rec.category_id if rec.category_id >= 0 else UNSET,
        campaign_id=rec.campaign_id or UNSET,
        item_id=rec.item_id if rec.item_id >= 0 else UNSET,
        pctr=rec.pctr_raw if rec.pctr_raw >= 0 else rec.pctr,
        pcvr=rec.pcvr if rec.pcvr >= 0 else UNSET,
        sequence=unpack_sequence(rec.sequence) if rec.sequence else UNSET,
    )
    return CtrFeedback(
        decision_id=key, ad_id=rec.ad_id, user_id=rec.user_id, clicked=clicked,
        decision_ts=rec.decision_ts, label_ts=label_ts, features=features,
        propensity=rec.propensity, converted=converted, policy=rec.policy, pctr=rec.pctr,
        model_version=rec.model_version, arm=rec.arm or UNSET,
        click_ts=rec.click_ts if clicked else UNSET, reason=reason,
    )  # fmt: skip
