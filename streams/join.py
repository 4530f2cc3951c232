"""ad-decisions x clicks (and purchases) -> ctr-feedback, partition-local.

user-events are keyed by the raw user id and ad-decisions by its pseudonym, but
each decision is written to its request's partition number (streams/pipeline.py),
so one worker sees a decision and its user's clicks. The state machine is
scoring/joinstate.py; this module owns the I/O around it: the ``pending`` table
(decision id -> record), an in-memory index per partition of each record's
deadline and of the users with clicked decisions (for purchases), and the
partition's watermark (scoring/watermark.py: the lower of the two inputs' event
times; the wall clock stands in for an input only while it is caught up to the
end of its partition and quiet, never on a backlog).

Order of effects, per batch and per timer tick, under one lock: read records,
apply, **send the labels and wait for their acks**, then write the records.
A crash before the labels are acked replays the batch from the state before
it: nothing lost. A crash after the acks but before the state is durable
replays it too and sends the same labels again: that is the one duplicate
window. A label's identity is its decision_id, so the learner, ``adpulse report``
and ``adpulse train`` count a repeat once. Timer-driven labels (clicked=0)
follow the same order.

A clicked=1 label of a cost-per-click decision also charges its bid to the
campaign's spend share of the partition (``settle``, streams/budget.py): written
and acked with the labels, before the records, and skipped on a replay by the
click's offset, so a click is charged exactly once.

Index cost: built by scanning the partition's RocksDB once after each
rebalance (O(records)); each tick then scans the index dict (O(records) dict
reads, no RocksDB) to find due records and loads only those.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from faust.types import TP

from scoring import joinstate as js
from scoring.abuse import ClickBurst
from scoring.dueindex import DueIndex
from scoring.watermark import Input, Watermarks
from streams.deadletter import Raw, Rejected
from streams.runtime.tablewriter import read_many, write_many

if TYPE_CHECKING:
    from streams.app import Wiring
    from streams.ingest import UserEventMsg

log = logging.getLogger(__name__)
JOIN_TICK_S = 1.0
# (partition, charges, now_ms) -> what completes when the spend they change is durable
Settle = Callable[[int, list[js.Charge], int], list[Awaitable[Any]]]


class SnapshotMsg(msgspec.Struct, gc=False):
    """The parts of a decision's ``features`` the pending record keeps."""

    interest: list[float] = []
    device: str = ""
    category_id: int = -1
    item_id: int = -1


class DecisionMsg(msgspec.Struct, gc=False):
    """The fields of an ad-decisions record the join keeps (our own output: lenient)."""

    request_id: str
    user_id: str
    ad_id: str | None
    ts: int
    pctr: float = 0.0
    propensity: float = 1.0
    policy: str = "unknown"
    model_version: str = "unknown"
    placement: str = ""
    campaign_id: str = ""
    arm: str = ""
    pctr_raw: float = -1.0
    features: SnapshotMsg | None = None
    bid: float = 0.0
    billing: str = "cpm"

    def click_price(self) -> float:
        """What a click on it costs: its bid if cost-per-click (a sane bid only), else 0."""
        return self.bid if self.billing == "cpc" and 0 < self.bid < math.inf else 0.0


_decode_decision = msgspec.json.Decoder(DecisionMsg).decode


class JoinStage:
    def __init__(self, w: Wiring, settle: Settle | None = None) -> None:
        """``settle``: charges clicks of cpc decisions (None: they are not charged)."""
        self.w = w
        self.settle = settle
        self.params = js.JoinParams.from_settings(w.settings)
        self.topic = w.settings.topic("ctr-feedback")
        self.inputs: dict[Input, str] = {
            "decisions": w.settings.topic("ad-decisions"),
            "events": w.settings.topic("user-events"),
        }
        self.lock = asyncio.Lock()
        self.due: dict[int, DueIndex] = {}  # partition -> decision id -> deadline
        self.clicked: dict[int, dict[str, set[str]]] = {}  # partition -> user -> decision ids
        self.watermark = Watermarks(int(w.settings.watermark_idle_s * 1000))
        self.gen: int | None = None
        self.burst = ClickBurst(w.settings.max_clicks_per_user_min)

    # -- inputs --------------------------------------------------------------------------
    async def on_decisions(
        self, raws: Sequence[Raw], now_ms: int
    ) -> tuple[list[Any], list[Rejected]]:
        by_part: dict[int, list[js.Decision]] = {}
        rejected: list[Rejected] = []
        ads: dict[str, tuple[int, int]] = {}
        newest: dict[int, int] = {}
        ends: dict[int, int] = {}
        for raw in raws:
            ends[raw.partition] = max(ends.get(raw.partition, 0), raw.offset + 1)
            try:
                d = _decode_decision(raw.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                rejected.append(Rejected(raw, "schema", str(exc)[:300]))
                continue
            newest[raw.partition] = max(newest.get(raw.partition, 0), d.ts)
            if d.ad_id is None:
                continue  # no fill: nothing to label
            f = d.features or SnapshotMsg()
            if f.category_id >= 0:  # the snapshot: the ad as it was when it was served
                cat, item = f.category_id, f.item_id
            else:
                cat, item = ads.get(d.ad_id) or ads.setdefault(d.ad_id, self._ad(d.ad_id))
            dec = js.Decision(
                d.request_id, raw.offset, d.user_id, d.ad_id, d.ts, d.propensity, d.policy,
                d.pctr, d.model_version, d.placement, d.campaign_id, cat, item, d.arm,
                d.pctr_raw, f.device, js.pack_interest(f.interest), d.click_price(),
            )  # fmt: skip
            by_part.setdefault(raw.partition, []).append(dec)
        futures: list[Any] = []
        for part, end in ends.items():
            seen: tuple[Input, int, int] = ("decisions", newest.get(part, 0), end)
            futures += await self._apply(part, by_part.get(part, []), [], now_ms, seen)
        return futures, rejected

    async def on_events(
        self,
        good: Sequence[tuple[UserEventMsg, Raw]],
        now_ms: int,
        ends: Mapping[int, int] | None = None,
    ) -> list[Any]:
        """Clicks on served ads and purchases of a user-events batch (already validated).

        ``ends``: partition -> the offset after the batch's last record, valid or not
        (the watermark's read position; without it, that of the last valid one).
        """
        by_part: dict[int, list[js.Event]] = {}
        newest: dict[int, int] = {}
        offsets: dict[int, int] = dict(ends or {})
        bursts: list[tuple[str, str]] = []
        for ev, raw in good:
            offsets[raw.partition] = max(offsets.get(raw.partition, 0), raw.offset + 1)
            newest[raw.partition] = max(newest.get(raw.partition, 0), ev.ts)
            if ev.kind == "click" and isinstance(ev.decision_id, str):
                at = now_ms if raw.broker_ms < 0 else raw.broker_ms  # abuse rules: broker time
                if self.burst.suspect(ev.user_id, at):  # never reaches the state machine
                    bursts.append(("burst", ev.user_id))
                    continue
                e = js.Event(raw.offset, ev.user_id, ev.ts, ev.decision_id, seen_ts=at)
            elif ev.kind == "purchase":
                e = js.Event(raw.offset, ev.user_id, ev.ts, "", ev.item_id, ev.category_id)
            else:
                continue
            by_part.setdefault(raw.partition, []).append(e)
        self._suspects(bursts)
        futures: list[Any] = []
        for part, end in offsets.items():
            seen: tuple[Input, int, int] = ("events", newest.get(part, 0), end)
            futures += await self._apply(part, [], by_part.get(part, []), now_ms, seen)
        return futures

    async def tick(self) -> None:
        """Advance idle partitions' watermarks by wall clock; label and expire what is due."""
        app = self.w.app
        if getattr(app, "rebalancing", False) or getattr(app, "in_recovery", False):
            return
        topic = self.w.ad_decisions.get_topic_name()
        now_ms = int(time.time() * 1000)
        for tp in app.assignor.assigned_actives():
            if tp.topic == topic:
                await self._apply(tp.partition, [], [], now_ms)

    # -- the one path every change takes -------------------------------------------------------
    async def _apply(
        self,
        part: int,
        decisions: list[js.Decision],
        events: list[js.Event],
        now_ms: int,
        seen: tuple[Input, int, int] | None = None,
    ) -> list[Any]:
        """``seen``: the input these records came from, their newest time, the offset after."""
        async with self.lock:  # the watermark moves with the records that move it, never before
            due, users = self._index(part)
            if seen is not None:
                inp, newest_ts, end = seen
                self.watermark.seen(part, inp, newest_ts, now_ms, end)
            wm = self.watermark.advance(part, now_ms, lambda inp: self._caught_up(part, inp))
            keys = {d.decision_id for d in decisions} | {e.decision_id for e in events}
            keys.discard("")
            for e in events:
                if not e.decision_id:
                    keys |= users.get(e.user_id, set())
            keys.update(due.due(wm))
            if not keys:
                return []
            ordered = sorted(keys)
            values = read_many(self.w.pending, part, [k.encode() for k in ordered])
            state = {k: js.decode(v) if v else None for k, v in zip(ordered, values, strict=True)}
            step = js.apply_batch(state, decisions, events, self.params)
            closed = js.close_due(state, wm, self.params)
            labels = step.labels + closed.labels
            charged: list[Awaitable[Any]] = []
            if step.charges and self.settle is not None:  # durable with the labels, as they are
                charged = self.settle(part, step.charges, now_ms)
            if labels:  # acked before the state that records them is written (see above)
                sends = [
                    await self.w.app.producer.send(
                        self.topic,
                        lab["ad_id"].encode(),
                        json.dumps(lab).encode(),
                        None,
                        None,
                        None,
                    )
                    for lab in labels
                ]
                await asyncio.gather(*sends, *charged)
            writes: list[tuple[bytes, bytes | None]] = []
            for key in sorted(step.changed | closed.changed | closed.deleted):
                rec, gone = state[key], key in closed.deleted
                assert rec is not None
                self._reindex(due, users, key, rec, gone)
                writes.append((key.encode(), None if gone else js.encode(rec)))
            self._count(labels, step.late_clicks, closed.expired, len(writes))
            self._suspects(step.suspect + closed.suspect)
            return await write_many(self.w.pending, part, writes)

    def _index(self, part: int) -> tuple[DueIndex, dict[str, set[str]]]:
        gen = self.w.app.consumer_generation_id
        if gen != self.gen:  # rebalanced: partitions may have been handled elsewhere meanwhile
            self.due.clear()
            self.clicked.clear()
            self.watermark.reset_inputs()
            self.gen = gen
        if part not in self.due:
            due = DueIndex()
            users: dict[str, set[str]] = {}
            db = self.w.pending.data._db_for_partition(part)
            for k, v in db.items():
                if k.startswith(b"__faust") or not isinstance(v, bytes):
                    continue
                try:
                    self._reindex(due, users, k.decode(), js.decode(v), deleted=False)
                except (msgspec.DecodeError, UnicodeDecodeError):
                    continue
            self.due[part], self.clicked[part] = due, users
            log.info("join index of partition %d: %d pending records", part, len(due))
        return self.due[part], self.clicked[part]

    def _caught_up(self, part: int, inp: Input) -> bool:
        """Whether the join has handled ``inp`` on ``part`` up to the end the last fetch saw.

        The position is the offset after the last record handed to the join (not
        the consumer's read offset, which counts a fetched batch not yet handled);
        before any, the consumer's committed start (Faust's ``_read_offset``).
        """
        consumer: Any = self.w.app.consumer
        tp = TP(self.inputs[inp], part)
        try:
            end = consumer.highwater(tp)
        except (AssertionError, KeyError):  # not (or no longer) assigned
            return False
        if end is None:  # not fetched yet
            return False
        pos = self.watermark.next_offset(part, inp)
        if pos is None:
            pos = consumer._read_offset.get(tp) or 0
        return bool(pos >= end)

    def _reindex(
        self,
        due: DueIndex,
        users: dict[str, set[str]],
        key: str,
        rec: js.Pending,
        deleted: bool,
    ) -> None:
        if deleted:
            due.discard(key)
        else:
            due.set(key, js.deadline(rec, self.params))
        if rec.status == js.CLICKED and not deleted:
            users.setdefault(rec.user_id, set()).add(key)
        elif rec.user_id in users:
            users[rec.user_id].discard(key)
            if not users[rec.user_id]:
                del users[rec.user_id]

    async def forget(self, part: int, user: str) -> tuple[list[Any], int]:
        """Delete every record of ``user`` (a pseudonym) on ``part``: tombstone futures, count.

        A scan of the partition's records (forget requests are rare; no per-user
        index is kept for them), under the same lock as every other change.
        """
        async with self.lock:
            due, users = self._index(part)
            db = self.w.pending.data._db_for_partition(part)
            gone: list[str] = []
            for k, v in db.items():
                if k.startswith(b"__faust") or not isinstance(v, bytes):
                    continue
                try:
                    rec = js.decode(v)
                except msgspec.DecodeError:
                    continue
                if rec.user_id == user:
                    gone.append(k.decode())
                    self._reindex(due, users, k.decode(), rec, deleted=True)
            users.pop(user, None)
            self.burst.forget(user)
            futures = await write_many(self.w.pending, part, [(k.encode(), None) for k in gone])
            return futures, len(gone)

    def _suspects(self, found: list[tuple[str, str]]) -> None:
        """Count suspect clicks by rule; log them with the pseudonym (never a raw id)."""
        if not found:
            return
        by_rule: dict[str, list[str]] = {}
        for rule, user in found:
            by_rule.setdefault(rule, []).append(user)
        for rule, users in by_rule.items():
            self.w.metrics.suspect_clicks.labels(rule).inc(len(users))
            shown = ", ".join(sorted(set(users))[:5])
            n = len(users)
            log.info("%d suspect click(s), rule %s, not labelled; users %s", n, rule, shown)

    def _ad(self, ad_id: str) -> tuple[int, int]:
        """(category_id, item_id) of an ad from the catalog, -1 where unknown."""
        try:
            value = self.w.catalog.data.get(ad_id.encode())
            ad = json.loads(value) if value else {}
        except (ValueError, KeyError):
            ad = {}
        return int(ad.get("category_id", -1)), int(ad.get("item_id", -1))

    def _count(self, labels: list[dict[str, Any]], late: int, expired: int, writes: int) -> None:
        m = self.w.metrics
        for lab in labels:
            outcome = (
                "converted" if "converted" in lab else ("clicked" if lab["clicked"] else "zero")
            )
            m.join_labels.labels(lab.get("policy", "unknown"), outcome).inc()
        if late:
            m.late_clicks.inc(late)
            log.info("%d late click(s) after their decision's label: counted, not emitted", late)
        m.pending_expired.inc(expired)
        m.table_writes.labels("pending").inc(writes)
