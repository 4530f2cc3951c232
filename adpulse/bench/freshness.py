"""Freshness as a user of the state sees it: event produced -> its user's count grows.

Shared by ``bench features`` and ``bench mixed``: a consumer placed at the end
of the interest changelog reads each user's state record as the worker writes
it; an event counts as fresh when its user's event counter passes it.
"""

from __future__ import annotations

import time

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings
from scoring.features import InterestParams, header_dtype


class ChangelogFreshness:
    def __init__(self, s: Settings) -> None:
        fields = header_dtype(InterestParams.from_settings(s)).fields
        assert fields is not None
        self.counts_at = int(fields["counts"][1])  # byte offset of the counters in a record
        self.tps = [
            TopicPartition(f"{s.app_id}-interest-changelog", p) for p in range(s.partitions)
        ]
        self.consumer = AIOKafkaConsumer(
            **client_kwargs(s), enable_auto_commit=False, fetch_max_wait_ms=1
        )
        self.sent: dict[bytes, list[float]] = {}  # state key -> produce times
        self.reported: dict[bytes, int] = {}
        self.fresh: list[float] = []  # seconds, one per event seen

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.assign(self.tps)
        await self.consumer.seek_to_end(*self.tps)
        for tp in self.tps:
            await self.consumer.position(tp)

    def mark(self, state_key: bytes) -> None:
        """Call as an event of this user (its key in the table) is produced."""
        self.sent.setdefault(state_key, []).append(time.perf_counter())

    async def watch(self, total: int) -> None:
        """Until ``total`` events were seen applied (cancel or time it out otherwise)."""
        while len(self.fresh) < total:
            batch = await self.consumer.getmany(timeout_ms=200)
            now = time.perf_counter()
            for records in batch.values():
                for rec in records:
                    times = self.sent.get(rec.key)
                    if times is None or rec.value is None:
                        continue
                    count = int(np.frombuffer(rec.value, "<u4", 5, self.counts_at).sum())
                    done = self.reported.get(rec.key, 0)
                    self.fresh.extend(now - t for t in times[done:count])
                    self.reported[rec.key] = max(done, count)

    async def stop(self) -> None:
        await self.consumer.stop()
