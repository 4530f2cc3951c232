"""Every worker reads the whole ad-catalog topic itself: the catalog the decisions use.

Why not Faust's GlobalTable (what this replaced): a GlobalTable learns other
workers' writes through its changelog's standby path, and Faust drops changelog
records that arrive around a rebalance and never reads them again (open upstream:
faust-streaming/faust#283, robinhood/faust#716; mechanism in robinhood/faust PR
#583). ``adpulse bench catalog-join`` measured it on Apache Kafka: with a second
worker joining while 3,000 ads loaded, a worker ended short (2,212 to 2,976 ads)
in 3 of 7 trials, for good, while the changelog held every ad. A consumer with
no group cannot lose records to a rebalance, because it takes part in none: it
is assigned every partition of the compacted topic and reads it from the
beginning, then follows it (Kafka Streams' GlobalKTable works the same way).

Each worker validates every record the same way (``check_catalog_record``): an
invalid record is skipped (the ad keeps its last valid version) and a tombstone
removes the ad. Dead-lettering stays with the group's agent on ad-catalog
(streams/pipeline.py), so each invalid record is dead-lettered once, by the
worker that owns its partition. ``ready`` turns true once the mirror has read
up to the end offsets it found at start; /health is 503 until then.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from adpulse.kafkaconf import client_kwargs
from adpulse.settings import Settings
from streams.catalog import check_catalog_record
from streams.seal import is_seal

log = logging.getLogger(__name__)
POLL_MS = 500


class CatalogMirror:
    """ad id -> latest valid ad-catalog record (JSON bytes); ``version`` moves on each change.

    >>> m = CatalogMirror(Settings(), dim=None)
    >>> m.apply(b"a1", b'{"ad_id": "a1"}'); m.version
    0
    >>> m.apply(b"a1", None); m.version  # a tombstone for an ad it never held
    0
    """

    def __init__(self, settings: Settings, dim: int | None) -> None:
        self.settings = settings
        self.dim = dim
        self.data: dict[bytes, bytes] = {}
        self.version = 0
        self.ready = False

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record: a tombstone removes the ad; an invalid record changes nothing."""
        if key is None or is_seal(key):
            return
        if value is None:
            if self.data.pop(key, None) is not None:
                self.version += 1
            return
        if self.data.get(key) != value and check_catalog_record(key, value, self.dim) is None:
            self.data[key] = value
            self.version += 1

    async def run(self) -> None:
        """Read the topic from the beginning and follow it until cancelled (worker stop)."""
        topic = self.settings.topic("ad-catalog")
        consumer = AIOKafkaConsumer(
            **client_kwargs(self.settings), client_id="adpulse-catalog-mirror",
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )  # fmt: skip
        await consumer.start()
        try:
            # With no group, a subscription is assigned every partition of the topic.
            consumer.subscribe([topic])
            ends: dict[TopicPartition, int] | None = None
            while True:
                batch = await consumer.getmany(timeout_ms=POLL_MS, max_records=10_000)
                for records in batch.values():
                    for rec in records:
                        self.apply(rec.key, rec.value)
                if not self.ready:
                    ends = await self._check_caught_up(consumer, ends)
        finally:
            await consumer.stop()

    async def _check_caught_up(
        self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int] | None
    ) -> dict[TopicPartition, int] | None:
        """Set ``ready`` once every partition's position reached the end offsets taken when
        its assignment first showed; returns those end offsets (None until then)."""
        tps = sorted(consumer.assignment())
        if not tps:
            return ends
        if ends is None:
            ends = await consumer.end_offsets(tps)
            log.info("catalog mirror reading %s up to %s", tps[0].topic, list(ends.values()))
        if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
            self.ready = True
            log.info("catalog mirror caught up: %d ads", len(self.data))
        return ends
