"""The main path, top to bottom: what happens to a batch of user events.

    user-events batch -> validate + dedupe + decay (streams/interest.py)
                      -> interest table (streams/tablewriter.py)
                      -> dead-letters for what was refused (streams/deadletter.py)

Later stages (decide, join, learn) hang off the same wiring.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from streams.consumer import Batch
from streams.deadletter import Raw, Rejected, dead_letter
from streams.interest import BatchResult, InterestStage
from streams.tablewriter import read_many, write_many

if TYPE_CHECKING:
    from streams.app import Wiring


def wire(w: Wiring) -> None:
    stage = InterestStage(w.settings)

    @w.app.batch_topic(w.user_events)
    async def on_user_events(batch: Batch) -> None:
        await ingest(w, stage, batch)


async def ingest(w: Wiring, stage: InterestStage, batch: Batch) -> None:
    """One batch of user-events: state written and changelogged before the batch is acked."""
    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    raws: list[Raw] = []
    oldest_ms = now_ms
    for tp, records in batch.items():
        part = tp.partition
        raws.extend(Raw(r.value, r.key, part, r.offset) for r in records)
        oldest_ms = min(oldest_ms, records[0].timestamp)

    def load(keys: Sequence[bytes], partitions: Sequence[int]) -> list[bytes | None]:
        return _load(w.interest, keys, partitions)

    result = stage.process(raws, load, now_ms)
    futures: list[Awaitable[Any]] = [*await _write(w, result)]
    futures += await _dead_letter(w, result.rejected, now_ms)
    await asyncio.gather(*futures)
    _count(w, result, len(raws), started, oldest_ms)


def _load(table: Any, keys: Sequence[bytes], partitions: Sequence[int]) -> list[bytes | None]:
    by_part: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(partitions):
        by_part[p].append(i)
    out: list[bytes | None] = [None] * len(keys)
    for p, idx in by_part.items():
        for i, value in zip(idx, read_many(table, p, [keys[i] for i in idx]), strict=True):
            out[i] = value
    return out


async def _write(w: Wiring, result: BatchResult) -> list[asyncio.Future[Any]]:
    by_part: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
    for key, part, value in result.writes:
        by_part[part].append((key, value))
    futures: list[asyncio.Future[Any]] = []
    for part, items in by_part.items():
        futures += await write_many(w.interest, part, items)
    return futures


async def _dead_letter(w: Wiring, rejected: list[Rejected], now_ms: int) -> list[Awaitable[Any]]:
    topic = w.settings.topic("user-events")
    futures: list[Awaitable[Any]] = []
    for rej in rejected:
        value = json.dumps(dead_letter(rej, topic, now_ms, stage="ingest")).encode()
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
