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
import logging
from collections.abc import Sequence
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


async def write_many(
    table: Any, partition: int, items: Sequence[tuple[bytes, bytes | None]]
) -> list[asyncio.Future[Any]]:
    """Write ``items`` (value None deletes) to RocksDB and the changelog; returns send futures.

    Await the futures before acknowledging the source batch: then an offset is
    only committed once the state it produced is in the changelog.
    """
    store, app = table.data, table.app
    db = store._db_for_partition(partition)
    key_index = store._key_index
    topic = table.changelog_topic.get_topic_name()
    changelog_tp = TP(topic, partition)
    producer = app.producer._producer  # the aiokafka producer (producer_threaded=False)
    write_batch = rocksdict.WriteBatch(raw_mode=True)
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
        if value is None:
            write_batch.delete(key)
        else:
            write_batch.put(key, value)
        key_index[key] = partition
        if record_batch.append(key=key, value=value, timestamp=None) is None:  # full
            await send(record_batch)
            record_batch = producer.create_batch()
            record_batch.append(key=key, value=value, timestamp=None)
    db.write(write_batch)
    if record_batch.record_count():
        await send(record_batch)
    return futures
