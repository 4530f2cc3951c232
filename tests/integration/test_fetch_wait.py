"""The worker's consumer fetch waits long only while nothing it fetched waits unread.

A real aiokafka consumer on the session's real broker, adapted as the worker's is
(streams/runtime/consumer.py, ``adapt_fetch_wait``): the counts of fetches built at each
wait show which one each got, and every record produced is still read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from adpulse.broker import EmbeddedBroker
from streams.runtime.consumer import FetchWaits, adapt_fetch_wait


async def _until(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """A condition wait: the bound only ends a hang; the box's speed changes no assertion."""
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"never saw: {what}") from None


async def _run(bootstrap: str, topic: str) -> tuple[FetchWaits, list[int], int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=10)  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    await consumer.start()
    await producer.start()
    try:
        consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        waits = adapt_fetch_wait(consumer, 10, 400)
        await _until(lambda: waits.idle >= 1, "a fetch with the long wait while idle")
        short_while_idle = waits.short
        for i in range(5):
            await producer.send(topic, f"r{i}".encode(), partition=0)
        await producer.flush()
        # Not taken: the records wait unread, partition 0 is left out of the next fetches,
        # and those wait the short time.
        await _until(lambda: waits.short >= 1, "a fetch with the short wait while records wait")
        idle_before = waits.idle
        read: list[int] = []
        for _ in range(50):  # the records may come in more than one fetch
            got = await consumer.getmany(timeout_ms=200)
            read += [int(r.value.decode()[1:]) for recs in got.values() for r in recs if r.value]
            if len(read) >= 5:
                break
        read.sort()
        await _until(lambda: waits.idle > idle_before, "the long wait again once taken")
        return waits, read, short_while_idle
    finally:
        await producer.stop()
        await consumer.stop()


def test_fetches_wait_long_while_nothing_waits_unread_and_short_while_records_do(
    broker: EmbeddedBroker, unique: str
) -> None:
    waits, read, short_while_idle = asyncio.run(_run(broker.bootstrap, f"{unique}.fetchwait"))
    assert short_while_idle == 0  # before any record: every fetch named every partition
    assert waits.short >= 1 and waits.idle >= 2
    assert read == [0, 1, 2, 3, 4]  # every record produced was read
