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
timers             -> model registry poll (hot-swap), catalog refresh,
                      consumer lag and table sizes (streams/runtime/gauges.py)
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from scoring.featurespec import FeatureSpec
from scoring.joinstate import Charge
from scoring.registry import LoadedModel, ModelRegistry
from scoring.strategy.policy import StrategyReader
from streams import forget, serve
from streams.catalog import CATALOG_REFRESH_S, CatalogCache, check_catalog_record
from streams.deadletter import Raw, Rejected, dead_letter
from streams.decide import AdRequestMsg, DecideResult, DecideStage, ServingModels, StateReaders
from streams.ingest import LOG_APPEND_TIME, broker_ms
from streams.interest import BatchResult, InterestStage
from streams.join import JOIN_TICK_S, JoinStage
from streams.learn import LearnStage, learn_batch
from streams.runtime.consumer import Batch
from streams.runtime.gauges import SAMPLE_S, sample_consumer_lag, sample_pacing, sample_table_keys
from streams.runtime.seal import is_seal
from streams.runtime.tablewriter import ChangelogBuffer, read_many, send_changelog, write_local

if TYPE_CHECKING:
    from streams.app import Wiring

log = logging.getLogger(__name__)


def wire(w: Wiring) -> None:
    interest = InterestStage(w.settings, pseudonyms=w.pseudonyms)
    models = load_models(w)
    catalog = CatalogCache(w.catalog, FeatureSpec.from_settings(w.settings), w.metrics)
    strategy = StrategyReader(w.strategy.get_many)
    decide = DecideStage(w.settings, models, catalog.get, strategy, pseudonyms=w.pseudonyms,
                         calibration=w.strategy.get_many,
                         generation=lambda: w.app.consumer_generation_id)  # fmt: skip
    learn = LearnStage(w.settings)
    # spend: re-read at flush, as the join's click charges and decisions interleave
    changelogs = DecisionChangelogs(ChangelogBuffer(w.freqcap),
                                    ChangelogBuffer(w.spend, reread=True))  # fmt: skip
    join = JoinStage(w, lambda part, charges, now_ms: settle_clicks(
        w, decide, changelogs.spend, part, charges, now_ms))  # fmt: skip
    # forget-requests: a user's state deleted (streams/forget.py)
    forget.wire(w, join, changelogs.caps)

    def decide_now(
        requests: Sequence[tuple[AdRequestMsg, Raw]],
    ) -> tuple[list[dict[str, Any]], serve.Log]:
        now_ms = int(time.time() * 1000)
        result = decide_requests(w, decide, requests, now_ms, w.settings.decide_tmax_ms)
        by_raw = {id(raw): d for _, raw, d in result.decisions}

        async def send() -> list[Awaitable[Any]]:
            return (await emit_decisions(w, result, changelogs))[: len(result.decisions)]

        return [by_raw[id(raw)] for _, raw in requests], send

    # POST /decide (streams/serve.py): the same decisions, answered synchronously
    serve.wire(w, decide_now, lambda: len(catalog.get() or ()))

    @w.app.batch_topic(w.user_events)
    async def on_user_events(batch: Batch) -> Awaitable[Any]:
        return await ingest(w, interest, batch, join)

    @w.app.batch_topic(w.ad_requests)
    async def on_ad_requests(batch: Batch) -> Awaitable[Any]:
        return await decide_batch(w, decide, batch, changelogs)

    @w.app.batch_topic(w.ad_decisions)
    async def on_ad_decisions(batch: Batch) -> Awaitable[Any]:
        return await join_decisions(w, join, batch)

    @w.app.timer(JOIN_TICK_S)
    async def close_join_windows() -> None:
        await join.tick()

    @w.app.batch_topic(w.ctr_feedback)
    async def on_ctr_feedback(batch: Batch) -> Awaitable[Any]:
        return await learn_batch(w, learn, batch)

    @w.app.task
    async def mirror_catalog() -> None:
        await w.catalog.run()

    @w.app.task
    async def mirror_strategy() -> None:
        await w.strategy.run()

    @w.app.agent(w.ad_catalog)
    async def catalog_dead_letters(stream: Any) -> None:
        """Invalid ad-catalog records, dead-lettered once by their partition's owner (every
        worker's mirror skips them: streams/catalogmirror.py)."""
        async for event in stream.events():
            if event.value is None or (event.key is not None and is_seal(event.key)):
                continue
            refused = check_catalog_record(event.key, event.value, w.settings.dim)
            if refused is not None:  # the ad keeps its last valid version
                msg, now_ms = event.message, int(time.time() * 1000)
                ts_ms = int((msg.timestamp or 0) * 1000)
                raw = Raw(event.value, event.key, msg.partition, msg.offset, ts_ms)
                rejected = [Rejected(raw, *refused)]
                await _dead_letter(w, rejected, now_ms, "ad-catalog", "catalog")

    @w.app.timer(CATALOG_REFRESH_S)
    async def refresh_catalog() -> None:
        catalog.refresh()

    @w.app.timer(w.settings.model_poll_s)
    async def poll_models() -> None:
        loaded = await asyncio.to_thread(models.registry.poll)
        if loaded is not None:
            models.swap(loaded, w.settings.fallback_ctr)
            _model_in_use(w, loaded)
            w.metrics.model_swaps.labels("swapped").inc()

    lag_labelled: set[tuple[str, str]] = set()
    pacing_labelled: set[str] = set()

    @w.app.timer(SAMPLE_S)
    async def sample_gauges() -> None:
        sample_consumer_lag(w.app, w.metrics, lag_labelled)
        sample_table_keys((w.interest, w.freqcap, w.spend), w.metrics)
        sample_pacing(decide.budget.gauges(int(time.time() * 1000)), w.metrics, pacing_labelled)
        w.metrics.calibration_labels.set(decide.calibration.labels)


def load_models(w: Wiring) -> ServingModels:
    def refused(version: str, reason: str) -> None:
        log.error("model %s refused, current model keeps serving: %s", version, reason)
        w.metrics.model_swaps.labels("refused").inc()

    registry = ModelRegistry.from_settings(w.settings, on_refused=refused)
    models = ServingModels.load(registry, w.settings.fallback_ctr)
    if models.current is None:
        log.error("no valid model in %s: decisions use the fallback rule", registry.root)
    else:
        _model_in_use(w, models.current)
    return models


def _model_in_use(w: Wiring, loaded: LoadedModel) -> None:
    log.info("serving model %s on %s", loaded.version, loaded.scorer.provider)
    w.metrics.model.info({"version": loaded.version, "provider": loaded.scorer.provider})


async def decide_batch(
    w: Wiring, stage: DecideStage, batch: Batch, changelogs: DecisionChangelogs
) -> Awaitable[Any]:
    """One batch of ad-requests: decisions sent, caps and spend written.

    Returns what completes when those writes are acknowledged; the consumer acks
    the batch then, and meanwhile moves on to the next one.
    """
    now_ms = int(time.time() * 1000)
    raws = [
        Raw(r.value, r.key, tp.partition, r.offset, r.timestamp)
        for tp, records in batch.items()
        for r in records
    ]
    good, rejected = stage.split_topic(raws)
    result = decide_requests(w, stage, good, now_ms, w.settings.topic_tmax_ms)
    futures = await emit_decisions(w, result, changelogs)
    futures += await _dead_letter(w, rejected, now_ms, "ad-requests", "decide")
    return asyncio.gather(*futures)


def decide_requests(
    w: Wiring,
    stage: DecideStage,
    requests: Sequence[tuple[AdRequestMsg, Raw]],
    now_ms: int,
    default_tmax_ms: int,
) -> DecideResult:
    """Decoded requests from either entry point (the topic, ``POST /decide``): decided in
    one :meth:`DecideStage.decide` call, caps and spend written to RocksDB, metrics
    counted, each decision's ``latency_ms`` set. Synchronous: the next decision, from
    either entry point, reads these caps (:func:`emit_decisions` sends the records).
    """
    tables = StateReaders(
        lambda k, p: _load(w.interest, k, p),
        lambda k, p: _load(w.freqcap, k, p),
        lambda k, p: _load(w.spend, k, p),
    )
    result = stage.decide(requests, tables, now_ms, default_tmax_ms)
    _write_local(w.freqcap, result.cap_writes)
    _write_local(w.spend, result.spend_writes)
    m = w.metrics
    done_ms = time.time() * 1000
    for _, raw, decision in result.decisions:
        decision["latency_ms"] = max(0.0, done_ms - raw.timestamp_ms)
        m.decision_latency.observe(decision["latency_ms"] / 1000)
    for (policy, placement), n in result.by_policy.items():
        m.decisions.labels(policy, placement).inc(n)
    for arm, n in result.by_arm.items():
        m.arm_decisions.labels(w.settings.experiment.split(":", 1)[0], arm).inc(n)
    for reason, n in result.no_fill.items():
        m.no_fill.labels(reason).inc(n)
    m.fallbacks.inc(result.fallbacks)
    for campaign, n in result.throttled.items():
        m.pacing_throttled.labels(campaign).inc(n)
    if result.rows_scored:
        m.scorer_rows.inc(result.rows_scored)
        m.scorer_batch_rows.observe(result.rows_scored)
    return result


async def emit_decisions(
    w: Wiring, result: DecideResult, changelogs: DecisionChangelogs
) -> list[Awaitable[Any]]:
    """Each decision to ad-decisions, then the caps' and spend's changelog records;
    returns the send futures, the decisions' first and in the result's order."""
    topic, encode = w.settings.topic("ad-decisions"), msgspec.json.encode
    futures: list[Awaitable[Any]] = []
    for key, raw, decision in result.decisions:
        # Keyed by the pseudonym, so the partition is given: the request's, where the
        # user's events are (the click join is partition-local).
        value = encode(decision)
        futures.append(await w.app.producer.send(topic, key, value, raw.partition, None, None))
    for buffer, writes in ((changelogs.caps, result.cap_writes),
                           (changelogs.spend, result.spend_writes)):  # fmt: skip
        futures += [buffer.add(p, items) for p, items in _by_partition(writes).items()]
    return futures


@dataclass(frozen=True)
class DecisionChangelogs:
    """The changelog records of decisions' cap and spend writes, sent in shared batches."""

    caps: ChangelogBuffer
    spend: ChangelogBuffer


def settle_clicks(
    w: Wiring,
    stage: DecideStage,
    spend: ChangelogBuffer,
    part: int,
    charges: list[Charge],
    now_ms: int,
) -> list[Awaitable[Any]]:
    """Clicks of cpc decisions charged to the partition's spend (the decision stage's own
    budget copy, so the two never overwrite each other); completes when changelogged."""
    writes = stage.budget.settle(part, charges, lambda k, p: _load(w.spend, k, p), now_ms)
    if not writes:
        return []
    _write_local(w.spend, writes)
    return [spend.add(part, [(key, value) for key, _, value in writes])]


async def join_decisions(w: Wiring, join: JoinStage, batch: Batch) -> Awaitable[Any]:
    """One batch of ad-decisions into the click join (labels sent before state is written)."""
    now_ms = int(time.time() * 1000)
    raws = [
        Raw(r.value, r.key, tp.partition, r.offset, r.timestamp)
        for tp, records in batch.items()
        for r in records
    ]
    futures, rejected = await join.on_decisions(raws, now_ms)
    futures += await _dead_letter(w, rejected, now_ms, "ad-decisions", "join")
    return asyncio.gather(*futures)


async def ingest(
    w: Wiring, stage: InterestStage, batch: Batch, join: JoinStage | None = None
) -> Awaitable[Any]:
    """One batch of user-events into RocksDB; returns what completes when changelogged.

    The batch is acked only once its changelog writes are acknowledged, so a
    committed offset never gets ahead of the state it produced.
    """
    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    raws: list[Raw] = []
    oldest_ms = now_ms
    for tp, records in batch.items():
        part = tp.partition
        raws.extend(
            Raw(r.value, r.key, part, r.offset, r.timestamp,
                broker_ms(r.timestamp, r.timestamp_type, now_ms))
            for r in records
        )  # fmt: skip
        oldest_ms = min(oldest_ms, records[0].timestamp)
        if records[0].timestamp_type != LOG_APPEND_TIME:
            _warn_create_time(tp.topic)

    def load(keys: Sequence[bytes], partitions: Sequence[int]) -> list[bytes | None]:
        return _load(w.interest, keys, partitions)

    async with w.interest_locks.hold(tp.partition for tp in batch):  # vs forget: tablewriter
        result = stage.process(raws, load, now_ms)
        futures: list[Awaitable[Any]] = [*await _write_by_partition(w.interest, result.writes)]
    futures += await _dead_letter(w, result.rejected, now_ms, "user-events", "ingest")
    if join is not None:
        ends = {tp.partition: records[-1].offset + 1 for tp, records in batch.items()}
        futures += await join.on_events(result.valid, now_ms, ends)
    _count(w, result, len(raws), started, oldest_ms)
    return asyncio.gather(*futures)


@functools.cache
def _warn_create_time(topic: str) -> None:
    log.warning(
        "%s has CreateTime timestamps: abuse rules count by arrival at this worker, so a "
        "backlog read at once may be rate-limited; set message.timestamp.type=LogAppendTime "
        "on the topic (README, Abuse rules)", topic,
    )  # fmt: skip


def _load(table: Any, keys: Sequence[bytes], partitions: Sequence[int]) -> list[bytes | None]:
    by_part: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(partitions):
        by_part[p].append(i)
    out: list[bytes | None] = [None] * len(keys)
    for p, idx in by_part.items():
        for i, value in zip(idx, read_many(table, p, [keys[i] for i in idx]), strict=True):
            out[i] = value
    return out


def _write_local(table: Any, writes: Sequence[tuple[bytes, int, bytes | None]]) -> None:
    for part, items in _by_partition(writes).items():
        write_local(table, part, items)


async def _send_by_partition(
    table: Any, writes: Sequence[tuple[bytes, int, bytes | None]]
) -> list[asyncio.Future[Any]]:
    futures: list[asyncio.Future[Any]] = []
    for part, items in _by_partition(writes).items():
        futures += await send_changelog(table, part, items)
    return futures


async def _write_by_partition(
    table: Any, writes: Sequence[tuple[bytes, int, bytes | None]]
) -> list[asyncio.Future[Any]]:
    """Every partition's RocksDB first (readers see all of it at once), then changelogs."""
    _write_local(table, writes)
    return await _send_by_partition(table, writes)


def _by_partition(
    writes: Sequence[tuple[bytes, int, bytes | None]],
) -> dict[int, list[tuple[bytes, bytes | None]]]:
    by_part: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
    for key, part, value in writes:
        by_part[part].append((key, value))
    return by_part


async def _dead_letter(
    w: Wiring, rejected: list[Rejected], now_ms: int, source: str, stage: str
) -> list[Awaitable[Any]]:
    topic = w.settings.topic(source)
    futures: list[Awaitable[Any]] = []
    for rej in rejected:
        value = json.dumps(dead_letter(rej, topic, now_ms, stage=stage)).encode()
        futures.append(await w.dead_letters.send(value=value))
        w.metrics.dead_letters.labels(topic, rej.reason).inc()
    return futures


def _count(w: Wiring, result: BatchResult, n: int, started: float, oldest_ms: int) -> None:
    m = w.metrics
    for (kind, outcome), count in result.outcomes.items():
        m.events.labels(kind, outcome).inc(count)
    m.table_writes.labels("interest").inc(len(result.writes))
    m.batch_events.observe(n)
    m.batch_seconds.observe(time.perf_counter() - started)
    m.freshness.observe(max(0.0, time.time() - oldest_ms / 1000))
    if result.newest_ts:
        m.newest_event_ts.set(result.newest_ts / 1000)
