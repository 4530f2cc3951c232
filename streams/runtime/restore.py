"""Bulk changelog restore: a worker reads its tables' changelogs straight into RocksDB.

Why: Faust's recovery hands every changelog record to the table one at a time:
an Event per record through the conductor and a queue, then, per record,
``need_recovery()``, which builds a Counter over every changelog partition the
worker holds. py-spy on a fresh worker restoring 100,000 users shows that
bookkeeping (``_slurp_changelogs``, ``active_remaining``, ``on_message``), not
RocksDB, as the cost: ~100 us a record, 121.7 s for 1,000,000 users, where a
bare aiokafka read of the same changelog took 11.5 s.

What: :class:`BulkRecovery` runs inside Faust's own recovery, after Faust has
built the highwaters of the active changelog partitions and before it builds
the offsets to start from. For each active partition of a plain RocksDB table
it reads the changelog from the table's persisted offset + 1 to that highwater
with a bare aiokafka consumer and writes each fetched batch into the
partition's RocksDB in one WriteBatch, *together with* the persisted offset of
its last record: a crash midway leaves a consistent prefix, exactly what
Faust's own ``apply_changelog_batch`` leaves. Faust then reads the persisted
offsets and replays only what was written after the highwater (normally
nothing), with its usual checks.

Only tables whose changelog records go to RocksDB unchanged are restored this
way: not global tables (every worker replays those as standbys; the catalog's
counts its changes), not tables with their own ``apply_changelog_batch`` or an
``on_changelog_event`` callback, not other stores. Everything else, and every
partition the bulk read could not finish, takes Faust's path from where the
bulk read stopped. The embedded broker's short end offsets are handled as
before: the changelogs are sealed before the highwaters are built
(streams/runtime/seal.py), so the highwater is exact.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import rocksdict
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from faust.stores.rocksdb import Store as RocksStore
from faust.tables.base import Collection
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP

from streams.runtime.seal import SEAL_KEY

log = logging.getLogger(__name__)
IDLE_GIVE_UP_S = 30.0  # no record for this long: leave the rest to Faust's recovery


def bulk_restorable(table: Any) -> bool:
    """True when the table's changelog records are written to RocksDB as they are."""
    store = getattr(table, "data", None)
    return (
        not table.is_global
        and isinstance(store, RocksStore)
        and store.use_rocksdict
        and type(table).apply_changelog_batch is Collection.apply_changelog_batch
        and getattr(table, "_on_changelog_event", None) is None
    )


class BulkRecovery(Recovery):
    """Faust's recovery, with the active partitions' backlog read in bulk first."""

    async def _build_offsets(
        self, consumer: Any, tps: set[TP], destination: Any, title: str
    ) -> None:
        client = getattr(self.app, "bulk_restore_client", None)  # BatchApp's, from settings
        if title == "active" and client:
            wanted = {
                tp: self.tp_to_table[tp]
                for tp in tps
                if tp in self.tp_to_table and bulk_restorable(self.tp_to_table[tp])
            }
            if wanted:
                await bulk_restore(
                    client,
                    wanted,
                    destination,
                    self.active_highwaters,
                    stop=self.signal_recovery_start.is_set,
                )
        await super()._build_offsets(consumer, tps, destination, title)

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        """Stop fetching the changelogs of the tables' active partitions once restored.

        Faust pauses a partition only in its own books (``pause_partitions``: it stops
        asking for its records) and resumes these after recovery anyway (tables with a
        recovery buffer of one, the default); aiokafka keeps fetching every assigned
        partition. The worker is the only writer of these changelogs and nothing reads
        them after recovery, so aiokafka fetched the first records the worker wrote to
        each one and held them unread, and while any fetched records wait unread it
        sends no fetch to their broker for 0.1 s (its ``prefetch_backoff``): every source
        partition on that broker stopped for 100 ms, twice in the first 0.4 s of ``bench
        features``, and again after each start or rebalance as each table's changelog
        partitions got their first records. Paused in aiokafka here, on the consumer's
        thread; standby partitions keep being read; the next rebalance's assignment starts
        unpaused, so its recovery reads what it needs.
        """
        await super().on_recovery_completed(generation_id)
        own = self.active_tps - self.standby_tps
        if not own or generation_id != self.app.consumer_generation_id:
            return
        thread = cast("Any", self.app.consumer)._thread  # BatchConsumer's aiokafka thread

        async def pause() -> None:  # on the consumer's thread: no rebalance in between
            consumer = thread._ensure_consumer()
            assigned = consumer.assignment()
            consumer.pause(*(tp for tp in (TopicPartition(t.topic, t.partition) for t in own)
                             if tp in assigned))  # fmt: skip

        try:
            await thread.call_thread(pause)
        except Exception as exc:  # only a saving: a stop or a rebalance may come first
            log.info("changelog partitions left unpaused after recovery: %r", exc)


async def bulk_restore(
    client: dict[str, Any],
    tables: dict[TP, Any],
    offsets: Any,
    highwaters: Any,
    stop: Any = lambda: False,
) -> int:
    """Apply changelog records (persisted offset, highwater] of each tp; returns records.

    ``client``: aiokafka keyword arguments (bootstrap and transport security,
    adpulse.core.kafkaconf.client_kwargs).
    ``offsets`` (Faust's active offsets: last applied per tp, None when nothing)
    is advanced to the last offset applied, as is each partition's persisted
    offset in RocksDB, in the same write as the records. ``stop()`` true (a new
    rebalance began) ends the read early; what was applied stays consistent.
    """
    todo: dict[TP, int] = {}
    for tp in tables:
        hw = highwaters.get(tp)
        start = offsets.get(tp)
        if hw is not None and hw >= 0 and (start is None or start < hw):
            todo[tp] = hw
    if not todo:
        return 0
    started = time.perf_counter()
    consumer = AIOKafkaConsumer(
        **client, enable_auto_commit=False, auto_offset_reset="earliest",
        fetch_max_wait_ms=10, max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20,
    )  # fmt: skip
    await consumer.start()
    applied = 0
    try:
        ktps = {TopicPartition(tp.topic, tp.partition): tp for tp in todo}
        consumer.assign(list(ktps))
        for ktp, tp in ktps.items():
            start = offsets.get(tp)
            if start is None or start < 0:
                await consumer.seek_to_beginning(ktp)
            else:
                consumer.seek(ktp, start + 1)
        last_record = time.monotonic()
        while todo and not stop():
            batch = await consumer.getmany(*[k for k, v in ktps.items() if v in todo],
                                           timeout_ms=500, max_records=50_000)  # fmt: skip
            if batch:
                last_record = time.monotonic()
            for ktp, records in batch.items():
                tp = ktps[ktp]
                hw = todo.get(tp)
                if hw is None:
                    continue
                applied += _write(tables[tp].data, tp, records, hw, offsets)
            for ktp, tp in ktps.items():
                if tp in todo and await consumer.position(ktp) > todo[tp]:
                    del todo[tp]
            if todo and time.monotonic() - last_record > IDLE_GIVE_UP_S:
                log.warning("bulk restore: no records for %.0fs; Faust's recovery continues "
                            "from offsets %s", IDLE_GIVE_UP_S,
                            {str(tp): offsets.get(tp) for tp in todo})  # fmt: skip
                break
    finally:
        await consumer.stop()
    log.info(
        "bulk restore: %d changelog records into %d partition(s) in %.1fs",
        applied, len(tables), time.perf_counter() - started,
    )  # fmt: skip
    return applied


def _write(store: Any, tp: TP, records: list[Any], hw: int, offsets: Any) -> int:
    """One WriteBatch: the records up to ``hw`` and the persisted offset of the last one."""
    batch = rocksdict.WriteBatch(raw_mode=True)
    last, n = None, 0
    for rec in records:
        if rec.offset > hw:
            break
        if rec.value is None:
            batch.delete(rec.key)
        else:
            batch.put(rec.key, rec.value)
        last, n = rec.offset, n + 1
    if last is None:
        return 0
    batch.put(store.offset_key, str(last).encode())
    store._db_for_partition(tp.partition).write(batch)
    offsets[tp] = last
    return n


class SealingTableManager(TableManager):
    """Seals changelogs before each recovery on the embedded broker (streams/runtime/seal.py);
    its recovery reads the active changelog backlog in bulk (:class:`BulkRecovery`)."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = BulkRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery

    async def on_rebalance(
        self, assigned: Any, revoked: Any, newly_assigned: Any, generation_id: int = 0
    ) -> None:
        if getattr(self.app, "seal_changelogs", False):
            await _seal(self.app, self.changelog_topics)
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)


async def _seal(app: Any, topics: set[str]) -> None:
    producer = app.producer
    for topic in sorted(topics):
        partitions = app.consumer.topic_partitions(topic) or 0
        for p in range(partitions):
            # One record, awaited alone: the broker stores it as a batch of one.
            fut = await producer.send(topic, SEAL_KEY, None, p, None, None)
            await fut
    log.info("sealed %d changelog topic(s) before recovery", len(topics))
