"""The handlers' one load, write and dead-letter helpers (streams/pipeline.py uses them).

Every table read of a batch is :func:`load` (one multi-get a partition); every write is
:func:`write`: each partition's RocksDB first, so readers see all of a batch at once, then
the changelog records (or, where RocksDB must change before the caller yields, its two
halves :func:`write_local_all` and :func:`changelog`); every refused record goes through
:func:`dead_letter_all`. Kept apart from the handlers so each handler reads as its
stage's steps, and the I/O rules live in one place.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from streams.deadletter import Raw, Rejected, dead_letter
from streams.runtime.tablewriter import ChangelogBuffer, read_many, send_changelog, write_local

if TYPE_CHECKING:
    from streams.runtime.consumer import Batch
    from streams.wiring import Wiring

Writes = Sequence[tuple[bytes, int, bytes | None]]  # key, partition, value (None deletes)


def raws(batch: Batch) -> list[Raw]:
    return [
        Raw(r.value, r.key, tp.partition, r.offset, r.timestamp)
        for tp, records in batch.items()
        for r in records
    ]


def load(table: Any, keys: Sequence[bytes], partitions: Sequence[int]) -> list[bytes | None]:
    """Values of ``keys``, each on its partition (None: absent): one multi-get a partition."""
    by_part: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(partitions):
        by_part[p].append(i)
    out: list[bytes | None] = [None] * len(keys)
    for p, idx in by_part.items():
        for i, value in zip(idx, read_many(table, p, [keys[i] for i in idx]), strict=True):
            out[i] = value
    return out


async def write(
    table: Any, writes: Writes, buffer: ChangelogBuffer | None = None
) -> list[Awaitable[Any]]:
    """Every partition's RocksDB first (readers see all of it at once), then the changelog
    records, sent now or through ``buffer``; returns what completes when they are acked."""
    return await changelog(table, write_local_all(table, writes), buffer)


def write_local_all(table: Any, writes: Writes) -> dict[int, list[tuple[bytes, bytes | None]]]:
    """:func:`write`'s first half, alone where RocksDB must change before the caller yields
    (a decision: the next one reads its caps); returns the records by partition."""
    by_part = by_partition(writes)
    for part, items in by_part.items():
        write_local(table, part, items)
    return by_part


async def changelog(
    table: Any,
    by_part: dict[int, list[tuple[bytes, bytes | None]]],
    buffer: ChangelogBuffer | None = None,
) -> list[Awaitable[Any]]:
    """:func:`write`'s second half: the records of :func:`write_local_all` to the changelog."""
    if buffer is not None:
        return [buffer.add(part, items) for part, items in by_part.items()]
    futures: list[Awaitable[Any]] = []
    for part, items in by_part.items():
        futures += await send_changelog(table, part, items)
    return futures


def by_partition(writes: Writes) -> dict[int, list[tuple[bytes, bytes | None]]]:
    by_part: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
    for key, part, value in writes:
        by_part[part].append((key, value))
    return by_part


async def dead_letter_all(
    w: Wiring, rejected: list[Rejected], now_ms: int, source: str, stage: str
) -> list[Awaitable[Any]]:
    topic = w.settings.topic(source)
    futures: list[Awaitable[Any]] = []
    for rej in rejected:
        value = json.dumps(dead_letter(rej, topic, now_ms, stage=stage)).encode()
        futures.append(await w.dead_letters.send(value=value))
        w.metrics.dead_letters.labels(topic, rej.reason).inc()
    return futures
