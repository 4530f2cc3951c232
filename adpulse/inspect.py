"""Read a topic back from the beginning, for the demo, tools and tests.

Counting is done by consuming, never by end offsets: the embedded broker reports
end offsets short when the last batch held several records (see docs/reference.md, "The
embedded broker"), and a real cluster's end offsets include transaction markers and
compacted gaps anyway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings


@dataclass(frozen=True, slots=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def read_topic(
    bootstrap: Settings | str,
    topic: str,
    *,
    expect: int | None = None,
    idle_s: float = 2.0,
    timeout_s: float = 30.0,
) -> list[Record]:
    """Every record of ``topic`` from offset 0, without joining a consumer group.

    Stops once nothing new arrived for ``idle_s`` seconds (after at least
    ``expect`` records, when given), or at ``timeout_s``: so a test that expects
    N records also sees an N+1st that should not be there.
    """
    from kafka import KafkaConsumer, TopicPartition  # noqa: PLC0415 - slow import

    consumer = KafkaConsumer(
        **client_kwargs(bootstrap),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        client_id="adpulse-inspect",
    )
    try:
        partitions: set[int] | None = None
        deadline = time.monotonic() + timeout_s
        while partitions is None:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                if time.monotonic() > deadline:
                    return []
                time.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[Record] = []
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200, max_records=10_000)
            for tp_records in batch.values():
                out.extend(Record(r.partition, r.offset, r.key, r.value) for r in tp_records)
            now = time.monotonic()
            if batch:
                last_new = now
            enough = expect is None or len(out) >= expect
            if enough and now - last_new > idle_s:
                break
        return out
    finally:
        consumer.close()
