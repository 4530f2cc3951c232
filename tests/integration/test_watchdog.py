"""The watchdog on a real consumer: frozen with records waiting, reported, then recovered.

The consumer is a real aiokafka consumer on the session broker, frozen the way
a stalled worker looked (partitions held, nothing fetched): its partitions are
paused behind its back. The watchdog must see the stall through a real
ListOffsets request, and its remedy (resume + seek) must bring every record in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from adpulse.broker import EmbeddedBroker
from streams.runtime.watchdog import StallWatchdog, check

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes


class AiokafkaView:
    """The watchdog's view of a bare aiokafka consumer; position = records handed out."""

    def __init__(self, consumer: AIOKafkaConsumer, got: dict[TopicPartition, int]) -> None:
        self.consumer = consumer
        self.got = got

    def partitions(self) -> list[Hashable]:
        return list(self.consumer.assignment())

    def position(self, tp: Hashable) -> int | None:
        return self.got.get(tp)  # type: ignore[call-overload]

    async def end_offsets(self, tps: list[Hashable]) -> Mapping[Hashable, int]:
        return await self.consumer.end_offsets(tps)  # type: ignore[no-any-return]

    async def unstick(self, tps: Mapping[Hashable, int]) -> None:
        self.consumer.resume(*tps)
        for tp, offset in tps.items():
            self.consumer.seek(tp, offset)  # type: ignore[arg-type]


async def frozen_then_recovered(bootstrap: str, topic: str) -> tuple[int, int, int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 2, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=10)  # fmt: skip
    await producer.start()
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(2)]
    consumer.assign(tps)
    got: dict[TopicPartition, int] = {}
    wd, view = StallWatchdog(stall_s=1.0), AiokafkaView(consumer, got)
    received = 0

    async def drain(seconds: float) -> None:
        nonlocal received
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            for tp, recs in (await consumer.getmany(timeout_ms=50)).items():
                got[tp] = recs[-1].offset + 1
                received += len(recs)
            await check(wd, view)

    try:
        for i in range(100):
            await producer.send(topic, f"v{i}".encode(), partition=i % 2)
        await producer.flush()
        await drain(2.0)
        before = received
        consumer.pause(*tps)  # frozen: partitions held, nothing fetched
        for i in range(100, 300):
            await producer.send(topic, f"v{i}".encode(), partition=i % 2)
        await producer.flush()
        for _ in range(40):
            await drain(0.1)
            if wd.stalls and received == 300:
                break
        await drain(1.5)  # progress clears the stall
        return before, wd.stalls, received, len(wd.stalled)
    finally:
        await consumer.stop()
        await producer.stop()


def test_frozen_consumer_is_reported_stalled_and_recovers_every_record(
    broker: EmbeddedBroker, unique: str
) -> None:
    before, stalled, received, still = asyncio.run(
        frozen_then_recovered(broker.bootstrap, f"{unique}-frozen")
    )
    assert before == 100
    assert stalled == 2, "both frozen partitions with records waiting must be reported"
    assert received == 300, "the remedy must bring in every record sent while frozen"
    assert still == 0, "progress must clear the stall"
