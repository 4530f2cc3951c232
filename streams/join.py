"""ad-decisions x clicks (and purchases) -> ctr-feedback, partition-local.

user-events are keyed by the raw user id and ad-decisions by its pseudonym, but
each decision is written to its request's partition number (streams/pipeline.py),
so one worker sees a decision and its user's clicks. The state machine is
scoring/joinstate.py; this module holds what sits around it: the records of the
``pending`` table (decision id -> record), an in-memory index per partition of each record's
deadline and of the users with clicked decisions (for purchases), and the
partition's watermark (scoring/watermark.py: the lower of the two inputs' event
times; the wall clock stands in for an input only while it is caught up to the
end of its partition and quiet, never on a backlog). It reads the ``pending``
table and the consumer's positions through what it is given, and returns what
to send and write; streams/pipeline.py does that I/O (``join_step``).

Order of effects, per batch and per timer tick: under one lock, read records, apply
(:meth:`JoinStage.step`), send the labels and take the records to write
(:meth:`JoinStage.settled`); then **wait for the labels' acks**, then write the
records. Steps go in the order the batches gave them, on tasks of their own
(:class:`StepChain`), so the batch loop never waits for a label's ack, and a step is
computed while the ones before it still wait for theirs, reading their records from
:class:`Unwritten` until they are written.
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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from adpulse.core.settings import Settings
from schemas.messages import UNSET, AdDecision, CtrFeedback, UserEvent
from scoring import joinstate as js
from scoring.abuse import ClickBurst
from scoring.dueindex import DueIndex
from scoring.watermark import Input, Watermarks
from streams.deadletter import Loader, Raw, Rejected
from streams.validate import ContractDecoder

log = logging.getLogger(__name__)
JOIN_TICK_S = 1.0


DECISION_MAX_BYTES = 64 * 1024  # a decision's interest vector may have up to 1024 numbers


def pending_decision(d: AdDecision, ad_id: str, offset: int, ad: tuple[int, int]) -> js.Decision:
    """What the pending record keeps of a filled decision (``ad_id``: its ad, not None).

    The ad's category and item are the snapshot's (the ad as it was when it was
    served), else ``ad``: the catalog's now (-1: unknown).
    """
    f = d.features
    if f is not UNSET and f.category_id is not UNSET:
        ad = f.category_id, -1 if f.item_id is UNSET else f.item_id
    return js.Decision(
        decision_id=d.request_id, offset=offset, user_id=d.user_id, ad_id=ad_id, ts=d.ts,
        propensity=d.propensity, policy=d.policy, pctr=d.pctr, model_version=d.model_version,
        placement="" if d.placement is UNSET else d.placement,
        campaign_id="" if d.campaign_id is UNSET else d.campaign_id,
        category_id=ad[0], item_id=ad[1], arm="" if d.arm is UNSET else d.arm,
        pctr_raw=-1.0 if d.pctr_raw is UNSET else d.pctr_raw,
        device="" if f is UNSET or f.device is UNSET else f.device,
        interest=js.pack_interest([] if f is UNSET else f.interest),
        click_price=d.click_price(), conversion_price=d.conversion_price(),
        pcvr=-1.0 if d.pcvr is UNSET else d.pcvr,
        sequence=b"" if f is UNSET or f.sequence is UNSET else js.pack_sequence(f.sequence),
    )  # fmt: skip


class Positions(Protocol):
    """Where the worker's consumer stands on a partition (streams/runtime/consumer.py)."""

    def highwater(self, topic: str, partition: int) -> int | None: ...
    def position(self, topic: str, partition: int) -> int | None: ...


@dataclass(frozen=True)
class PendingReads:
    """How the join reads its ``pending`` table: given by streams/pipeline.py."""

    load: Loader  # keys, their partitions -> values
    scan: Callable[[int], Iterable[tuple[bytes, bytes]]]  # every record of a partition


@dataclass
class JoinInput:
    """Records for one partition of the join; ``seen``: the input they came from, their
    newest time, the offset after them (None: a timer tick)."""

    part: int
    decisions: list[js.Decision] = field(default_factory=list)
    events: list[js.Event] = field(default_factory=list)
    seen: tuple[Input, int, int] | None = None


@dataclass
class JoinStep:
    """One change of a partition's join state: ``labels`` to send (and ``charges`` to
    settle) before :meth:`JoinStage.settled` gives the records to write."""

    part: int
    state: dict[str, js.Pending | None]
    labels: list[CtrFeedback]
    charges: list[js.Charge]
    changed: set[str]
    deleted: set[str]
    late_clicks: int
    expired: int
    suspect: list[tuple[str, str]]  # (rule, pseudonym)
    index: tuple[DueIndex, dict[str, set[str]]]  # the partition's, as the step read it


# A computed step: what must be acknowledged before its records are written (its labels,
# its charges), and the write itself, which returns what completes when that is durable.
Prepared = tuple[list[Awaitable[Any]], Callable[[], Awaitable[list[Awaitable[Any]]]]]
Step = Callable[[], Awaitable[Prepared | None]]


class StepChain:
    """The click join's steps, in the order they were submitted, each on tasks of its own,
    so that the batch loop that submits them goes on; a group commit.

    Why: a step that emits labels waits for their acknowledgement before it writes the
    records that say so (the order this module's docstring explains). Awaited by the
    handlers, that wait held the whole batch loop (17.3 s of a demo whose live part
    lasted 36.9 s); on a chain of its own where each step waited for the one before it
    to write, the chain spent 3.0-3.9 s of every 5 s waiting for acks, and the batch
    loop waited as long for its batches' steps (docs/performance.md, "The click join's
    steps"). So a step is two phases: it is *computed* (records read, labels sent, the
    join's indexes moved: the step function) as soon as the one before it was computed,
    and *written* (the ``commit`` it returns) once its own acks are in and the one
    before it was written. Its acks overlap the next steps' computing and acks.

    Still exact: a step reads what the ones before it wrote or will write (their records
    not yet written are read from :class:`Unwritten`), no record is written before its
    step's labels are acknowledged, and records are written in submission order. A step
    submitted before a rebalance is dropped unrun if the consumer's generation moved on
    (its batch is never acknowledged, so its owner handles it again), and the first
    step of a new generation is computed only once every earlier one is written. Once a
    step failed every later one fails too, unwritten (their batches are never
    acknowledged; the worker stops on the first, as on any failed write). A batch is
    acknowledged only when its steps' writes are (:func:`durable`).
    """

    def __init__(self, generation: Callable[[], int | None]) -> None:
        self.generation = generation
        self.computed: asyncio.Task[Prepared | None] | None = None
        self.tail: asyncio.Task[list[Awaitable[Any]]] | None = None  # the last written
        self._gen: int | None = None  # the generation the last computed step ran in

    def submit(self, step: Step) -> asyncio.Task[list[Awaitable[Any]]]:
        """Computes ``step()`` after every step submitted before it was computed, and writes
        its records after theirs; the result: what completes when they are acknowledged."""
        computed = asyncio.ensure_future(
            self._compute(self.computed, self.tail, self.generation(), step)
        )
        written = asyncio.ensure_future(self._write(self.tail, computed))
        self.computed, self.tail = computed, written
        return written

    async def drained(self) -> None:
        """Until every step submitted so far has been written."""
        if self.tail is not None:
            await asyncio.wait([self.tail])

    async def _compute(
        self,
        previous: asyncio.Task[Prepared | None] | None,
        written: asyncio.Task[list[Awaitable[Any]]] | None,
        gen: int | None,
        step: Step,
    ) -> Prepared | None:
        await _after(previous)
        if gen != self.generation():
            return None  # rebalanced since it was submitted: its batch is never acknowledged
        if gen != self._gen:  # a new generation reads only what is written
            await _after(written)
            self._gen = gen
        return await step()

    async def _write(
        self,
        previous: asyncio.Task[list[Awaitable[Any]]] | None,
        computed: asyncio.Task[Prepared | None],
    ) -> list[Awaitable[Any]]:
        prepared = await computed
        await _after(previous)
        if prepared is None:
            return []
        acks, commit = prepared
        await asyncio.gather(*acks)
        return await commit()


async def _after(task: asyncio.Task[Any] | None) -> None:
    """Until ``task`` is done; raises if it failed (a later step never runs past a failure)."""
    if task is None:
        return
    await asyncio.wait([task])
    if task.cancelled() or task.exception() is not None:
        msg = "an earlier step of the click join failed"
        raise RuntimeError(msg)


class Unwritten:
    """Records of the ``pending`` table that computed steps will write once their labels
    are acknowledged (:class:`StepChain`): what a later step reads instead of the table.

    Each entry is the newest value given for its key; it is dropped when the step that
    gave it has written it, so a key given again by a later step stays until that step
    writes too.
    """

    def __init__(self) -> None:
        self._values: dict[tuple[int, bytes], tuple[int, bytes | None]] = {}
        self._seq = 0
        self._empty = asyncio.Event()
        self._empty.set()

    async def empty(self) -> None:
        """Until every record given so far is written (a forget request: under the stage's
        lock no step computes, and the computed ones write without it)."""
        await self._empty.wait()

    def __len__(self) -> int:
        return len(self._values)

    def put(self, part: int, writes: Sequence[tuple[bytes, bytes | None]]) -> int:
        """Records a step will write (None: a delete); its ticket for :meth:`written`."""
        self._seq += 1
        for key, value in writes:
            self._values[(part, key)] = (self._seq, value)
        if self._values:
            self._empty.clear()
        return self._seq

    def written(self, part: int, writes: Sequence[tuple[bytes, bytes | None]], ticket: int) -> None:
        for key, _ in writes:
            if self._values.get((part, key), (None, None))[0] == ticket:
                del self._values[(part, key)]
        if not self._values:
            self._empty.set()

    def over(self, load: Loader) -> Loader:
        """``load`` with these records in front of the table's."""

        def overlaid(keys: Sequence[bytes], parts: Sequence[int]) -> list[bytes | None]:
            values = load(keys, parts)
            if not self._values:
                return values
            out = list(values)
            for i, (key, part) in enumerate(zip(keys, parts, strict=True)):
                got = self._values.get((part, key))
                if got is not None:
                    out[i] = got[1]
            return out

        return overlaid


async def durable(step: Awaitable[list[Awaitable[Any]]]) -> None:
    """Completes when a submitted step has run and its writes are acknowledged."""
    await asyncio.gather(*await step)


class JoinStage:
    def __init__(
        self,
        settings: Settings,
        pending: PendingReads,
        positions: Positions,
        generation: Callable[[], int | None],
        ad: Callable[[bytes], bytes | None],
    ) -> None:
        """``generation``: the consumer's (a change: rebalanced); ``ad``: a catalog record."""
        self.pending = pending
        self.positions = positions
        self.generation = generation
        self.ad_record = ad
        self.params = js.JoinParams.from_settings(settings)
        self.inputs: dict[Input, str] = {
            "decisions": settings.topic("ad-decisions"),
            "events": settings.topic("user-events"),
        }
        # Held by streams/pipeline.py from a step's read to its write, so each change
        # of a partition's records sees the one before it whole.
        self.lock = asyncio.Lock()
        self.due: dict[int, DueIndex] = {}  # partition -> decision id -> deadline
        self.clicked: dict[int, dict[str, set[str]]] = {}  # partition -> user -> decision ids
        self.watermark = Watermarks(int(settings.watermark_idle_s * 1000))
        self.gen: int | None = None
        self.burst = ClickBurst(settings.max_clicks_per_user_min)
        self.decoder = ContractDecoder("ad-decisions", AdDecision, DECISION_MAX_BYTES)

    # -- inputs --------------------------------------------------------------------------
    def on_decisions(self, raws: Sequence[Raw]) -> tuple[list[JoinInput], list[Rejected]]:
        by_part: dict[int, list[js.Decision]] = {}
        rejected: list[Rejected] = []
        ads: dict[str, tuple[int, int]] = {}
        newest: dict[int, int] = {}
        ends: dict[int, int] = {}
        for raw in raws:
            ends[raw.partition] = max(ends.get(raw.partition, 0), raw.offset + 1)
            d = self.decoder.decode(raw)
            if isinstance(d, Rejected):
                rejected.append(d)
                continue
            newest[raw.partition] = max(newest.get(raw.partition, 0), d.ts)
            if d.ad_id is None:
                continue  # no fill: nothing to label
            ad = (-1, -1)
            if d.features is UNSET or d.features.category_id is UNSET:  # no snapshot of the ad
                ad = ads.get(d.ad_id) or ads.setdefault(d.ad_id, self._ad(d.ad_id))
            dec = pending_decision(d, d.ad_id, raw.offset, ad)
            by_part.setdefault(raw.partition, []).append(dec)
        inputs = [
            JoinInput(part, by_part.get(part, []), [], ("decisions", newest.get(part, 0), end))
            for part, end in ends.items()
        ]
        return inputs, rejected

    def on_events(
        self,
        good: Sequence[tuple[UserEvent, Raw]],
        now_ms: int,
        ends: Mapping[int, int] | None = None,
    ) -> tuple[list[JoinInput], list[tuple[str, str]]]:
        """Clicks on served ads and purchases of a user-events batch (already validated),
        and the suspect clicks (rule, pseudonym) the abuse rules held back.

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
        inputs = [
            JoinInput(part, [], by_part.get(part, []), ("events", newest.get(part, 0), end))
            for part, end in offsets.items()
        ]
        return inputs, bursts

    # -- the one path every change takes, under ``lock`` ---------------------------------------
    def step(self, inp: JoinInput, now_ms: int) -> JoinStep | None:
        """Read the records ``inp`` touches and those now due, apply; None: nothing to do.

        Call under :attr:`lock`, and hold it until the step's records are taken
        (:meth:`settled`) and readable by the next step (:class:`Unwritten`): the
        watermark moves with the records that move it, never before.
        """
        part = inp.part
        due, users = self._index(part)
        if inp.seen is not None:
            kind, newest_ts, end = inp.seen
            self.watermark.seen(part, kind, newest_ts, now_ms, end)
        wm = self.watermark.advance(part, now_ms, lambda kind: self._caught_up(part, kind))
        keys = {d.decision_id for d in inp.decisions} | {e.decision_id for e in inp.events}
        keys.discard("")
        for e in inp.events:
            if not e.decision_id:
                keys |= users.get(e.user_id, set())
        keys.update(due.due(wm))
        if not keys:
            return None
        ordered = sorted(keys)
        values = self.pending.load([k.encode() for k in ordered], [part] * len(ordered))
        state = {k: js.decode(v) if v else None for k, v in zip(ordered, values, strict=True)}
        step = js.apply_batch(state, inp.decisions, inp.events, self.params)
        closed = js.close_due(state, wm, self.params)
        return JoinStep(
            part, state, step.labels + closed.labels, step.charges,
            step.changed | closed.changed, closed.deleted, step.late_clicks, closed.expired,
            step.suspect + closed.suspect, (due, users),
        )  # fmt: skip

    def settled(self, step: JoinStep) -> list[tuple[bytes, bytes | None]]:
        """The step's records to write (None deletes), and the in-memory indexes moved to
        match: as the step is computed, so the next step finds what this one changed
        (reading its records from :class:`Unwritten`); the records themselves are written
        once the step's labels are acknowledged (:class:`StepChain`)."""
        due, users = step.index
        writes: list[tuple[bytes, bytes | None]] = []
        for key in sorted(step.changed | step.deleted):
            rec, gone = step.state[key], key in step.deleted
            assert rec is not None
            self._reindex(due, users, key, rec, gone)
            writes.append((key.encode(), None if gone else js.encode(rec)))
        return writes

    def _index(self, part: int) -> tuple[DueIndex, dict[str, set[str]]]:
        gen = self.generation()
        if gen != self.gen:  # rebalanced: partitions may have been handled elsewhere meanwhile
            self.due.clear()
            self.clicked.clear()
            self.watermark.reset_inputs()
            self.gen = gen
        if part not in self.due:
            due = DueIndex()
            users: dict[str, set[str]] = {}
            for k, v in self.pending.scan(part):
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
        before any, the consumer's committed start.
        """
        topic = self.inputs[inp]
        end = self.positions.highwater(topic, part)
        if end is None:  # not fetched yet, or not (or no longer) assigned
            return False
        pos = self.watermark.next_offset(part, inp)
        if pos is None:
            pos = self.positions.position(topic, part) or 0
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

    def forget(self, part: int, user: str) -> list[bytes]:
        """The keys of every record of ``user`` (a pseudonym) on ``part``, dropped from the
        indexes: streams/pipeline.py writes their tombstones, under :attr:`lock`.

        A scan of the partition's records (forget requests are rare; no per-user
        index is kept for them).
        """
        due, users = self._index(part)
        gone: list[bytes] = []
        for k, v in self.pending.scan(part):
            try:
                rec = js.decode(v)
            except msgspec.DecodeError:
                continue
            if rec.user_id == user:
                gone.append(k)
                self._reindex(due, users, k.decode(), rec, deleted=True)
        users.pop(user, None)
        self.burst.forget(user)
        return gone

    def _ad(self, ad_id: str) -> tuple[int, int]:
        """(category_id, item_id) of an ad from the catalog, -1 where unknown."""
        try:
            value = self.ad_record(ad_id.encode())
            ad = json.loads(value) if value else {}
        except (ValueError, KeyError):
            ad = {}
        return int(ad.get("category_id", -1)), int(ad.get("item_id", -1))
