"""Every worker reads whole compacted topics itself: the ad catalog and the learners' state.

Two kinds of state every worker's decisions need in full, whoever wrote it: the
ad catalog (``ad-catalog``) and the learners' per-ad state (the ``learn``
table's changelog, written by the worker that owns the ad's ctr-feedback
partition; streams/learn.py). Each is a :class:`TopicMirror`.

Why not Faust's GlobalTable (what this replaced, for both): a GlobalTable learns other
workers' writes through its changelog's standby path, and Faust drops changelog
records that arrive around a rebalance and never reads them again (open upstream:
faust-streaming/faust#283, robinhood/faust#716; mechanism in robinhood/faust PR
#583). ``adpulse bench catalog-join`` measured it on Apache Kafka: with a second
worker joining while 3,000 ads loaded, a worker ended short (2,212 to 2,976 ads)
in 3 of 7 trials, for good, while the changelog held every ad. The learners'
``strategy`` GlobalTable did worse: ``adpulse bench promises`` found a label
applied on one worker never reaching the other's table at all (404 after 3 s). A consumer with
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
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from adpulse.core.kafkaconf import client_kwargs, mirror_fetch_wait_ms
from adpulse.core.settings import Settings
from streams.catalog import TextCheck, check_catalog_record
from streams.runtime.seal import is_seal

log = logging.getLogger(__name__)
POLL_MS = 500


def catalog_mirror(
    settings: Settings, dim: int | None, text_check: TextCheck | None = None
) -> TopicMirror:
    """ad id -> latest valid ad-catalog record (JSON bytes)."""
    return TopicMirror(
        settings,
        settings.topic("ad-catalog"),
        "catalog",
        lambda key, value: check_catalog_record(key, value, dim, text_check) is None,
    )


class TopicMirror:
    """key -> latest accepted value of a compacted topic; ``version`` moves on each change.

    >>> m = TopicMirror(Settings(), "t", "test")
    >>> m.apply(b"k", b"v"); m.version, m.get_many([b"k", b"x"])
    (1, [b'v', None])
    >>> m.apply(b"x", None); m.version  # a tombstone for a key it never held
    1
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        name: str,
        accept: Callable[[bytes, bytes], bool] = lambda _k, _v: True,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.name = name  # in the client id and the log lines
        self.accept = accept  # a record it refuses changes nothing (the key keeps its last)
        self.data: dict[bytes, bytes] = {}
        self.version = 0
        self.ready = False

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record: a tombstone removes the key; a refused record changes nothing."""
        if key is None or is_seal(key):
            return
        if value is None:
            if self.data.pop(key, None) is not None:
                self.version += 1
            return
        if self.data.get(key) != value and self.accept(key, value):
            self.data[key] = value
            self.version += 1

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.data.get(k) for k in keys]

    async def run(self) -> None:
        """Read the topic from the beginning and follow it until cancelled (worker stop)."""
        consumer = AIOKafkaConsumer(
            **client_kwargs(self.settings), client_id=f"adpulse-{self.name}-mirror",
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_wait_ms=mirror_fetch_wait_ms(self.settings),
        )  # fmt: skip
        await consumer.start()
        try:
            # With no group, a subscription is assigned every partition of the topic.
            consumer.subscribe([self.topic])
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
            log.info("%s mirror reading %s up to %s", self.name, tps[0].topic, list(ends.values()))
        if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
            self.ready = True
            log.info("%s mirror caught up: %d records", self.name, len(self.data))
        return ends
