"""Bulk reads and writes of a raw/raw Faust RocksDB table, one partition at a time.

Faust's ``table[key] = value`` costs ~25 us a key on this machine: one message
through Faust's producer buffer, one RocksDB put, a second RocksDB put for the
changelog offset on every acknowledgement, sensors. The interest stage writes
thousands of keys per batch, so here a partition's keys go to RocksDB in one
WriteBatch and to the changelog in aiokafka record batches (one produce future
per ~1 MB, not per key). The table's persisted changelog offset is advanced
when each record batch is acknowledged, exactly as Faust's own
``Table._on_changelog_sent`` does, so recovery after a restart starts where it
should.

Never mix this with ``table[key] = value`` on the same table: the two take
different producer paths with no ordering between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import rocksdict
from faust.types import TP

log = logging.getLogger(__name__)


def read_many(table: Any, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
    """Stored values for ``keys`` of one partition (None where absent), in one multi-get."""
    if not keys:
        return []
    db = table.data._db_for_partition(partition)
    values: list[bytes | None] = db[list(keys)]
    return values


def scan(table: Any, partition: int) -> Iterator[tuple[bytes, bytes]]:
    """Every stored (key, value) of one partition, Faust's own bookkeeping keys left out.

    A full pass over the partition's RocksDB: for rebuilding an in-memory index after a
    rebalance, or for a rare scan (a forget request), never per record.
    """
    for key, value in table.data._db_for_partition(partition).items():
        if isinstance(value, bytes) and not key.startswith(b"__faust"):
            yield key, value


def aiokafka_producer(app: Any) -> Any:
    """The aiokafka producer under Faust's (``producer_threaded`` must stay off)."""
    return app.producer._producer


def open_db(path: Path) -> Any:
    """A RocksDB opened as a worker's Faust table opens each partition's (its options), for
    tools that measure what the tables cost (``adpulse bench secondary``)."""
    from faust.stores.rocksdb import RocksDBOptions  # noqa: PLC0415

    return RocksDBOptions().open(path)


def write_local(table: Any, partition: int, items: Sequence[tuple[bytes, bytes | None]]) -> None:
    """Apply ``items`` (value None deletes) to the partition's RocksDB in one WriteBatch.

    Synchronous, so a reader that runs after it (on the same event loop) sees the
    writes even before their changelog records are sent (:func:`send_changelog`).

    Faust's key -> partition index is left alone: it is a cache (a key it lacks is
    looked for in each open partition, ``Store._get_bucket_for_key``), our reads name
    the partition, and keeping it cost a locked LRU insert and eviction per key written:
    164,176 of them for 1,000 ingest batches of ~83 events (cProfile in the worker,
    ``bench features``).
    """
    db = table.data._db_for_partition(partition)
    write_batch = rocksdict.WriteBatch(raw_mode=True)
    for key, value in items:
        if value is None:
            write_batch.delete(key)
        else:
            write_batch.put(key, value)
    db.write(write_batch)


async def send_changelog(
    table: Any, partition: int, items: Sequence[tuple[bytes, bytes | None]]
) -> list[asyncio.Future[Any]]:
    """Send ``items`` to the table's changelog in record batches; returns send futures.

    Await the futures before acknowledging the source batch: then an offset is
    only committed once the state it produced is in the changelog.
    """
    store, app = table.data, table.app
    topic = table.changelog_topic.get_topic_name()
    changelog_tp = TP(topic, partition)
    producer = aiokafka_producer(app)
    futures: list[asyncio.Future[Any]] = []

    def on_sent(fut: asyncio.Future[Any], n: int) -> None:
        if fut.cancelled() or fut.exception() is not None:
            log.error("changelog write to %s failed: %r", changelog_tp, fut)
            return
        store.set_persisted_offset(changelog_tp, fut.result().offset + n - 1)

    async def send(record_batch: Any) -> None:
        n = record_batch.record_count()
        fut = await producer.send_batch(record_batch, topic, partition=partition)
        fut.add_done_callback(lambda f: on_sent(f, n))
        futures.append(fut)

    record_batch = producer.create_batch()
    for key, value in items:
        if record_batch.append(key=key, value=value, timestamp=None) is None:  # full
            await send(record_batch)
            record_batch = producer.create_batch()
            record_batch.append(key=key, value=value, timestamp=None)
    if record_batch.record_count():
        await send(record_batch)
    return futures


async def write_many(
    table: Any, partition: int, items: Sequence[tuple[bytes, bytes | None]]
) -> list[asyncio.Future[Any]]:
    """:func:`write_local`, then :func:`send_changelog`: RocksDB and the changelog."""
    write_local(table, partition, items)
    return await send_changelog(table, partition, items)


class PartitionLocks:
    """One asyncio lock per partition of a table, for read-modify-writes that await.

    A batch's RocksDB write is synchronous, but its changelog records go out
    partition after partition, awaiting the producer in between. Another writer of
    the same key that runs in that gap (a forget's tombstone) lands in the
    changelog *before* the batch's older value, so a restored worker would bring
    the forgotten value back. Whoever holds a partition's lock from its read to its
    changelog append (not the acknowledgement) keeps the changelog in the order
    of the table. Locks are taken in partition order, so two holders never deadlock.
    """

    def __init__(self) -> None:
        self._locks: dict[int, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, partitions: Iterable[int]) -> AsyncIterator[None]:
        held: list[asyncio.Lock] = []
        try:
            for part in sorted(set(partitions)):
                lock = self._locks.setdefault(part, asyncio.Lock())
                await lock.acquire()
                held.append(lock)
            yield
        finally:
            for lock in reversed(held):
                lock.release()


class ChangelogBuffer:
    """Changelog records of many small writes to one table, sent together.

    ``POST /decide`` runs are small (often one request), and each wrote its cap
    and spend records as its own record batch per partition: at 400 runs a
    second the producer's per-batch work (accumulator, drain waits, timers)
    took more of the worker than scoring did. Here RocksDB is written at once
    (:func:`write_local`, by the caller) and the changelog records wait up to
    ``flush_s``; a key written twice in that time is sent once, with its last
    value. :meth:`add` returns what completes when the records are acknowledged.

    ``reread``: send each key's value as RocksDB holds it at the flush, not the
    value added. For a table with two writers on one event loop (spend: decisions
    and the click join), whose adds can arrive after a newer local write of the
    same key: the changelog then still ends with the newest value. A key RocksDB
    does not hold keeps the value added, so a reread never sends a delete.
    """

    def __init__(self, table: Any, flush_s: float = 0.005, reread: bool = False) -> None:
        self.table = table
        self.flush_s = flush_s
        self.reread = reread
        self.pending: dict[int, dict[bytes, bytes | None]] = {}
        self.waiters: list[asyncio.Future[None]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # A flush awaits the producer between partitions; the next one, started by
        # its timer meanwhile, must not append a newer record of a key before it.
        self._order = asyncio.Lock()

    def add(
        self, partition: int, items: Sequence[tuple[bytes, bytes | None]]
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self.pending.setdefault(partition, {}).update(items)
        done: asyncio.Future[None] = loop.create_future()
        self.waiters.append(done)
        if self._handle is None:
            self._handle = loop.call_later(self.flush_s, self._start)
        return done

    def _start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        self._tasks.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    def _records(
        self, part: int, items: dict[bytes, bytes | None]
    ) -> list[tuple[bytes, bytes | None]]:
        records = list(items.items())
        if not self.reread:
            return records
        now = read_many(self.table, part, [key for key, _ in records])
        return [(key, value if fresh is None else fresh)
                for (key, value), fresh in zip(records, now, strict=True)]  # fmt: skip

    async def _flush(self) -> None:
        pending, waiters = self.pending, self.waiters
        self.pending, self.waiters, self._handle = {}, [], None
        error: BaseException | None = None
        try:
            futures: list[asyncio.Future[Any]] = []
            async with self._order:
                for part, items in pending.items():
                    futures += await send_changelog(self.table, part, self._records(part, items))
            for result in await asyncio.gather(*futures, return_exceptions=True):
                if isinstance(result, BaseException):
                    error = result
        except Exception as exc:  # the waiters learn of it: their batches are not acked
            error = exc
        for w in waiters:
            if not w.done():
                if error is None:
                    w.set_result(None)
                else:
                    w.set_exception(error)
