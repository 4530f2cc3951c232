"""The main path, top to bottom: what happens to each batch, stage by stage.

user-events batch  -> validate + dedupe + decay (streams/interest.py)
                   -> interest table (streams/runtime/tablewriter.py)
ad-requests batch  -> candidates, caps, budgets, one scoring run, strategy
                      (streams/decide.py) -> ad-decisions
anything refused   -> dead-letters (streams/deadletter.py)
ad-decisions batch -> click join: decisions x clicks/purchases (streams/join.py)
  + clicks, buys      -> pending table; labels -> ctr-feedback; cpc clicks -> spend table
ctr-feedback batch -> dedupe + Thompson/LinUCB/calibration (streams/learn.py)
                   -> learn table (its changelog mirrored by every worker: read by decide)
forget-requests    -> the user's interest, freqcap, pending records deleted by
                      tombstones (streams/forget.py) -> forget-confirmations
timers             -> click-join windows closed, model registry poll (hot-swap),
                      catalog refresh, consumer lag and table sizes (streams/runtime/gauges.py)

Every handler is here; the stages return results and these do their I/O through
one load helper, one write helper (RocksDB, then the changelog) and one dead-letter
helper, in streams/tableio.py (imported here under their old private names).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgspec

from schemas.messages import AdDecision, AdRequest
from scoring.featurespec import FeatureSpec
from scoring.joinstate import Charge
from scoring.strategy.policy import StrategyReader
from streams import counts, forget, serve, timers
from streams.catalog import CatalogCache, check_catalog_record
from streams.deadletter import Raw, Rejected
from streams.decide import DecideResult, DecideStage, StateReaders
from streams.ingest import LOG_APPEND_TIME, broker_ms
from streams.interest import InterestStage
from streams.items import check_item_record
from streams.join import (
    JOIN_TICK_S,
    JoinInput,
    JoinStage,
    PendingReads,
    Prepared,
    StepChain,
    Unwritten,
    durable,
)
from streams.lane import DecisionLane
from streams.learn import LearnStage
from streams.runtime.consumer import Batch, Positions
from streams.runtime.seal import is_seal
from streams.runtime.tablewriter import (
    ChangelogBuffer,
    scan,
)
from streams.sequence import SequenceStage
from streams.tableio import changelog as _changelog
from streams.tableio import dead_letter_all as _dead_letter
from streams.tableio import load as _load
from streams.tableio import raws as _raws
from streams.tableio import write as _write
from streams.tableio import write_local_all as _write_local
from streams.wiring import Wiring

log = logging.getLogger(__name__)


def wire(w: Wiring) -> None:
    interest = InterestStage(w.settings, pseudonyms=w.pseudonyms)
    sequences = SequenceStage(w.settings.sequence_length) if w.sequence is not None else None
    # Ingest's changelog records wait in buffers: sent directly, every slice of a batch
    # waited for its previous record batch to drain (docs/performance.md, "Ingest after
    # items and sequences"); forget's tombstones take the same buffers, so they keep order.
    tables = IngestChangelogs(
        ChangelogBuffer(w.interest), ChangelogBuffer(w.sequence) if w.sequence is not None else None
    )
    models = timers.load_models(w)
    catalog = CatalogCache(w.catalog, FeatureSpec.from_settings(w.settings), w.metrics,
                           w.adtext.fill if w.adtext else None)  # fmt: skip
    if w.adtext is not None:  # streams/adtext.py
        w.adtext.metrics = w.metrics
    strategy = StrategyReader(w.strategy.get_many)
    decide = DecideStage(w.settings, models, catalog.get, strategy, pseudonyms=w.pseudonyms,
                         calibration=w.strategy.get_many,
                         generation=lambda: w.app.consumer_generation_id,
                         items=w.items.get if w.items else lambda: None,
                         embeddings=interest.table)  # fmt: skip
    guard = serve.IngestGuard(w.settings.decide_max_ingest_lag_ms)  # /decide gives way to ingest
    lane = DecisionLane(decide, w.settings.scorer_thread, busy=guard.busy)  # streams/lane.py
    learn = LearnStage(w.settings)
    # spend: re-read at flush, as the join's click charges and decisions interleave
    changelogs = DecisionChangelogs(ChangelogBuffer(w.freqcap),
                                    ChangelogBuffer(w.spend, reread=True))  # fmt: skip
    unwritten = Unwritten()  # records of computed join steps, until written (StepChain)
    pending = PendingReads(
        unwritten.over(functools.partial(_load, w.pending)), functools.partial(scan, w.pending)
    )

    def generation() -> int | None:
        return cast("int | None", w.app.consumer_generation_id)

    join = Join(
        JoinStage(w.settings, pending, Positions(w.app), generation,
                  lambda k: w.catalog.get_many([k])[0]),
        functools.partial(settle_clicks, w, lane, changelogs.spend),
        StepChain(generation),
        unwritten,
    )  # fmt: skip

    async def decide_now(
        requests: Sequence[tuple[AdRequest, Raw]],
    ) -> tuple[list[AdDecision], serve.Log]:
        tmax = w.settings.decide_tmax_ms
        result, written = await decide_requests(w, lane, requests, tmax, changelogs)
        by_raw = {id(raw): d for _, raw, d in result.decisions}

        async def send() -> list[Awaitable[Any]]:
            return (await emit_decisions(w, result, written))[: len(result.decisions)]

        return [by_raw[id(raw)] for _, raw in requests], send

    # POST /decide (streams/serve.py): the same decisions, answered synchronously
    service = serve.wire(w, decide_now, lambda: len(catalog.get() or ()), guard)
    # ingest's slices are short while requests come, longer while decisions give way to it
    # (streams/runtime/consumer.py, Slicer)
    w.app.slicer.contended = lambda: service.asked_within(serve.ASKED_WINDOW_S)
    w.app.slicer.stretch = lambda: 1.0 / guard.cap

    @w.app.batch_topic(w.user_events)
    async def on_user_events(batch: Batch) -> Awaitable[Any]:
        return await ingest(w, interest, batch, join, sequences, tables, guard.saw)

    @w.app.batch_topic(w.ad_requests)
    async def on_ad_requests(batch: Batch) -> Awaitable[Any]:
        return await decide_batch(w, lane, batch, changelogs, guard)

    @w.app.batch_topic(w.ad_decisions)
    async def on_ad_decisions(batch: Batch) -> Awaitable[Any]:
        return await join_decisions(w, join, batch)

    @w.app.timer(JOIN_TICK_S)
    async def close_join_windows() -> None:
        await join_tick(w, join)

    @w.app.batch_topic(w.ctr_feedback)
    async def on_ctr_feedback(batch: Batch) -> Awaitable[Any]:
        return await learn_batch(w, learn, batch)

    @w.app.agent(w.forget_requests)
    async def forget_requests(stream: Any) -> None:
        async for event in stream.events():
            m = event.message
            raw = Raw(event.value, event.key, m.partition, m.offset, int(m.timestamp * 1000))
            await forget_user(w, join, changelogs.caps, raw, tables, lane.lock)

    @w.app.agent(w.ad_catalog)
    async def catalog_dead_letters(stream: Any) -> None:
        """Invalid ad-catalog records, dead-lettered once by their partition's owner (every
        worker's mirror skips them: streams/catalogmirror.py)."""
        async for event in stream.events():
            await check_catalog(w, event)

    if w.item_catalog is not None:  # streams/items.py

        @w.app.agent(w.item_catalog)
        async def item_dead_letters(stream: Any) -> None:
            """Invalid item-catalog records, dead-lettered once, as ad-catalog's are."""
            async for event in stream.events():
                await check_catalog(w, event, "item-catalog")

    timers.wire(w, models, catalog, decide)


# -- user-events -----------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestChangelogs:
    """The interest and sequence tables' changelog buffers (None: records sent at once)."""

    interest: ChangelogBuffer | None = None
    sequence: ChangelogBuffer | None = None


async def ingest(
    w: Wiring,
    stage: InterestStage,
    batch: Batch,
    join: Join | None,
    sequences: SequenceStage | None,
    tables: IngestChangelogs,
    lag: Callable[[float], None],
) -> Awaitable[Any]:
    """One batch of user-events into RocksDB; returns what completes when changelogged.

    ``lag`` is told how old the batch's oldest event is as its writes begin (what
    ``POST /decide`` gives way to: streams/serve.py, ``IngestGuard``).

    The batch is acked only once its changelog writes are acknowledged, so a
    committed offset never gets ahead of the state it produced. ``tables`` is required:
    forget_user must get the same buffers, or a tombstone could overtake the user's records.
    """
    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    raws: list[Raw] = []
    oldest_ms = arrived_ms = now_ms
    for tp, records in batch.items():
        part = tp.partition
        raws.extend(
            Raw(r.value, r.key, part, r.offset, r.timestamp,
                broker_ms(r.timestamp, r.timestamp_type, now_ms))
            for r in records
        )  # fmt: skip
        first = records[0]
        oldest_ms = min(oldest_ms, first.timestamp)
        arrived_ms = min(arrived_ms, broker_ms(first.timestamp, first.timestamp_type, now_ms))
        if first.timestamp_type != LOG_APPEND_TIME:
            _warn_create_time(tp.topic)
    lag((now_ms - arrived_ms) / 1000)  # by the broker's clock: a replay's CreateTime is old

    async with w.interest_locks.hold(tp.partition for tp in batch):  # vs forget: tablewriter
        result = stage.process(raws, functools.partial(_load, w.interest), now_ms)
        # Both tables change before anything yields, so a reader sees both or neither.
        interest_writes = _write_local(w.interest, result.writes)
        sequence_writes = {}
        if sequences is not None and w.sequence is not None:  # the same events' last N
            load = functools.partial(_load, w.sequence)
            seq = sequences.process(result.valid, load, result.columns)
            sequence_writes = _write_local(w.sequence, seq.writes)
        buf = tables
        futures: list[Awaitable[Any]] = [
            *await _changelog(w.interest, interest_writes, buf.interest)
        ]
        if sequence_writes:
            futures += await _changelog(w.sequence, sequence_writes, buf.sequence)
    futures += await _dead_letter(w, result.rejected, now_ms, "user-events", "ingest")
    if join is not None:
        ends = {tp.partition: records[-1].offset + 1 for tp, records in batch.items()}
        inputs, suspects = join.stage.on_events(result.valid, now_ms, ends)
        counts.suspect_clicks(w.metrics, suspects)
        futures += [join.submit(w, inp, now_ms) for inp in inputs]
    counts.ingested(w.metrics, result, len(raws), started, oldest_ms)
    return asyncio.gather(*futures)


@functools.cache
def _warn_create_time(topic: str) -> None:
    log.warning(
        "%s has CreateTime timestamps: abuse rules count by arrival at this worker, so a "
        "backlog read at once may be rate-limited; set message.timestamp.type=LogAppendTime "
        "on the topic (docs/security.md, Abuse rules)", topic,
    )  # fmt: skip


# -- ad-requests (and POST /decide) ----------------------------------------------------------
async def decide_batch(
    w: Wiring,
    lane: DecisionLane,
    batch: Batch,
    changelogs: DecisionChangelogs,
    guard: serve.IngestGuard,
) -> Awaitable[Any]:
    """One batch (a slice: streams/runtime/consumer.py) of ad-requests: decisions sent,
    caps and spend written.

    While decisions give way to ingest (``guard``: the one ``POST /decide`` asks), the
    slice is answered at once with ``shed`` no fills instead, unscored: a queue of
    requests behind an ingest backlog would otherwise grow into seconds (docs/decide.md,
    "Decisions give way to ingest"). Returns what completes when the writes are
    acknowledged; the consumer acks the batch then, and meanwhile moves on to the next one.
    """
    good, rejected = lane.stage.split_topic(_raws(batch))
    tmax = w.settings.topic_tmax_ms
    if good and not guard.admit():
        result = lane.stage.shed(good, int(time.time() * 1000), tmax)
        written: list[Awaitable[Any]] = []
        _decided(w, result)
    else:
        result, written = await decide_requests(w, lane, good, tmax, changelogs)
    futures = await emit_decisions(w, result, written)
    now_ms = int(time.time() * 1000)
    futures += await _dead_letter(w, rejected, now_ms, "ad-requests", "decide")
    return asyncio.gather(*futures)


async def decide_requests(
    w: Wiring,
    lane: DecisionLane,
    requests: Sequence[tuple[AdRequest, Raw]],
    default_tmax_ms: int,
    changelogs: DecisionChangelogs,
) -> tuple[DecideResult, list[Awaitable[Any]]]:
    """Decoded requests from either entry point (the topic, ``POST /decide``): decided in
    one :meth:`DecideStage.decide` call (its model runs on the lane's thread), caps and
    spend written to RocksDB and handed to their changelog buffers, metrics counted,
    each decision's ``latency_ms`` set. Under the lane's lock from the reads to those
    writes: the next decision, from either entry point, reads these caps, and their
    changelog records keep the table's order (:func:`emit_decisions` sends the
    decisions). Returns the result and what completes when its writes are acked.
    """
    tables = StateReaders(
        functools.partial(_load, w.interest),
        functools.partial(_load, w.freqcap),
        functools.partial(_load, w.spend),
        None if w.sequence is None else functools.partial(_load, w.sequence),
    )

    def write(result: DecideResult) -> list[Awaitable[Any]]:
        caps = _write_local(w.freqcap, result.cap_writes)
        spend = _write_local(w.spend, result.spend_writes)
        return [*(changelogs.caps.add(p, items) for p, items in caps.items()),
                *(changelogs.spend.add(p, items) for p, items in spend.items())]  # fmt: skip

    result, written = await lane.decide(requests, tables, default_tmax_ms, write)
    _decided(w, result)
    return result, written


def _decided(w: Wiring, result: DecideResult) -> None:
    """Each decision's ``latency_ms`` set and observed; the result's counts."""
    done_ms, observe = time.time() * 1000, w.metrics.decision_latency.observe
    for _, raw, decision in result.decisions:
        decision.latency_ms = max(0.0, done_ms - raw.timestamp_ms)
        observe(decision.latency_ms / 1000)
    counts.decided(w.metrics, w.settings, result)


async def emit_decisions(
    w: Wiring, result: DecideResult, written: list[Awaitable[Any]]
) -> list[Awaitable[Any]]:
    """Each decision to ad-decisions; returns the send futures, the decisions' first and
    in the result's order, then ``written`` (its caps' and spend's changelog records)."""
    topic, encode = w.settings.topic("ad-decisions"), msgspec.json.encode
    futures: list[Awaitable[Any]] = []
    for key, raw, decision in result.decisions:
        # Keyed by the pseudonym, so the partition is given: the request's, where the
        # user's events are (the click join is partition-local).
        value = encode(decision)
        futures.append(await w.app.producer.send(topic, key, value, raw.partition, None, None))
    return futures + written


@dataclass(frozen=True)
class DecisionChangelogs:
    """The changelog records of decisions' cap and spend writes, sent in shared batches."""

    caps: ChangelogBuffer
    spend: ChangelogBuffer


async def settle_clicks(
    w: Wiring,
    lane: DecisionLane,
    spend: ChangelogBuffer,
    part: int,
    charges: list[Charge],
    now_ms: int,
) -> list[Awaitable[Any]]:
    """Clicks of cpc decisions charged to the partition's spend (the decision stage's own
    budget copy, so the two never overwrite each other; between decision batches, under
    the lane's lock); completes when changelogged."""
    async with lane.lock:
        load = functools.partial(_load, w.spend)
        writes = lane.stage.budget.settle(part, charges, load, now_ms)
        if not writes:
            return []
        _write_local(w.spend, writes)
        return [spend.add(part, [(key, value) for key, _, value in writes])]


# -- the click join (ad-decisions, and the clicks of user-events) ----------------------------
@dataclass(frozen=True)
class Join:
    """The click join, how it charges clicks of cpc decisions (:func:`settle_clicks`), and
    the chain its steps run on (streams/join.py, ``StepChain``)."""

    stage: JoinStage
    settle: Callable[[int, list[Charge], int], Awaitable[list[Awaitable[Any]]]]
    steps: StepChain
    unwritten: Unwritten  # what the stage reads of ``pending`` before it is written

    def submit(self, w: Wiring, inp: JoinInput, now_ms: int) -> Awaitable[None]:
        """:func:`join_step` after the steps submitted before it; what completes when
        its writes are acknowledged (what a batch's acknowledgement waits for)."""
        return durable(self.steps.submit(functools.partial(join_step, w, self, inp, now_ms)))


async def join_decisions(w: Wiring, join: Join, batch: Batch) -> Awaitable[Any]:
    """One batch of ad-decisions into the click join (labels sent before state is written)."""
    now_ms = int(time.time() * 1000)
    inputs, rejected = join.stage.on_decisions(_raws(batch))
    futures = [join.submit(w, inp, now_ms) for inp in inputs]
    futures += await _dead_letter(w, rejected, now_ms, "ad-decisions", "join")
    return asyncio.gather(*futures)


async def join_tick(w: Wiring, join: Join) -> None:
    """Advance idle partitions' watermarks by wall clock; label and expire what is due."""
    app = w.app
    if getattr(app, "rebalancing", False) or getattr(app, "in_recovery", False):
        return
    topic = w.ad_decisions.get_topic_name()
    now_ms = int(time.time() * 1000)
    for tp in app.assignor.assigned_actives():
        if tp.topic == topic:
            step = functools.partial(join_step, w, join, JoinInput(tp.partition), now_ms)
            await join.steps.submit(step)


async def join_step(w: Wiring, join: Join, inp: JoinInput, now_ms: int) -> Prepared | None:
    """One change of a partition's click join, in the order streams/join.py explains: the
    labels (and the clicks' charges) sent, and the records to write once they are
    acknowledged (``StepChain`` awaits the acks, then calls the write, in step order).
    The records are readable by later steps at once, through ``join.unwritten``."""
    async with join.stage.lock:
        step = join.stage.step(inp, now_ms)
        if step is None:
            return None
        acks: list[Awaitable[Any]] = []
        if step.charges:  # durable with the labels, as they are
            acks += await join.settle(step.part, step.charges, now_ms)
        if step.labels:  # acked before the state that records them is written
            topic, send = w.settings.topic("ctr-feedback"), w.app.producer.send
            acks += [await send(topic, lab.ad_id.encode(), msgspec.json.encode(lab),
                                None, None, None) for lab in step.labels]  # fmt: skip
        writes = join.stage.settled(step)
        counts.joined(w.metrics, step, len(writes))
        ticket = join.unwritten.put(step.part, writes)

    async def commit() -> list[Awaitable[Any]]:
        try:
            return await _write(w.pending, [(key, step.part, value) for key, value in writes])
        finally:
            join.unwritten.written(step.part, writes, ticket)

    return acks, commit


# -- ctr-feedback ----------------------------------------------------------------------------
async def learn_batch(w: Wiring, stage: LearnStage, batch: Batch) -> Awaitable[Any]:
    """One batch of ctr-feedback: writes to ``learn`` (its changelog feeds every worker's
    ``strategy`` mirror)."""
    now_ms = int(time.time() * 1000)
    result = stage.process(_raws(batch), functools.partial(_load, w.learn))
    futures = await _write(w.learn, result.writes)
    futures += await _dead_letter(w, result.rejected, now_ms, "ctr-feedback", "learn")
    counts.learned(w.metrics, result)
    return asyncio.gather(*futures)


# -- forget-requests -------------------------------------------------------------------------
async def forget_user(
    w: Wiring,
    join: Join,
    caps: ChangelogBuffer,
    raw: Raw,
    tables: IngestChangelogs,
    decisions: asyncio.Lock | None = None,
) -> None:
    """One forget request (streams/forget.py): tombstones acked, then the confirmation sent.

    The freqcap tombstone goes through ``caps``, the buffer the decisions' cap records
    wait in, under ``decisions`` (the decision lane's lock, streams/lane.py), so no
    decision batch that read the user's caps before it writes them after it, and no
    cap record written just before can be sent after it.
    """
    now_ms = int(time.time() * 1000)
    req = forget.check(raw)
    if isinstance(req, Rejected):
        await _dead_letter(w, [req], now_ms, "forget-requests", "forget")
        return
    user = w.pseudonyms(req.user_id)
    key, part = user.encode(), raw.partition
    found: dict[str, int] = {}
    futures: list[Awaitable[Any]] = []
    # Under the partition's lock: an ingest batch that read the user before this
    # tombstone has its changelog records sent before it (streams/runtime/tablewriter.py).
    async with w.interest_locks.hold([part]):
        found["interest"] = sum(v is not None for v in _load(w.interest, [key], [part]))
        buf = tables  # ingest's buffers (required): after its records of the user
        futures += await _write(w.interest, [(key, part, None)], buf.interest)
        if w.sequence is not None:  # the user's behaviours go with their interest
            futures += await _write(w.sequence, [(key, part, None)], buf.sequence)
    async with decisions or asyncio.Lock():
        found["freqcap"] = sum(v is not None for v in _load(w.freqcap, [key], [part]))
        futures += await _write(w.freqcap, [(key, part, None)], caps)
    await join.steps.drained()  # the steps of batches before this request come first
    async with join.stage.lock:  # no step computes meanwhile ...
        await join.unwritten.empty()  # ... and every computed one has written its records
        gone = join.stage.forget(part, user)
        futures += await _write(w.pending, [(k, part, None) for k in gone])
    found["pending"] = len(gone)
    await asyncio.gather(*futures)  # every tombstone is in its changelog
    topic = w.settings.topic("forget-confirmations")
    value = forget.confirmation(req, now_ms, part, found)
    await (await w.app.producer.send(topic, req.request_id.encode(), value, part, None, None))
    w.metrics.forget_requests.inc()
    log.info(
        "forgot user %s on partition %d: interest %d, freqcap %d, pending %d record(s)",
        user, part, found["interest"], found["freqcap"], found["pending"],
    )  # fmt: skip


# -- ad-catalog -----------------------------------------------------------------------------
async def check_catalog(w: Wiring, event: Any, source: str = "ad-catalog") -> None:
    """One ad-catalog (or item-catalog) record: dead-lettered if invalid (the ad or item
    keeps its last valid version)."""
    if event.value is None or (event.key is not None and is_seal(event.key)):
        return
    text_check = w.adtext.check if w.adtext else None  # streams/adtext.py
    if source == "item-catalog":
        refused = check_item_record(event.key, event.value, text_check)
    else:
        refused = check_catalog_record(event.key, event.value, w.settings.dim, text_check)
    if refused is not None:
        msg, now_ms = event.message, int(time.time() * 1000)
        ts_ms = int((msg.timestamp or 0) * 1000)
        raw = Raw(event.value, event.key, msg.partition, msg.offset, ts_ms)
        stage = "items" if source == "item-catalog" else "catalog"
        await _dead_letter(w, [Rejected(raw, *refused)], now_ms, source, stage)
