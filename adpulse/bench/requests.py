"""Ad requests offered to the ``ad-requests`` topic as a Poisson process, and the clients
that send them and read the decisions back: the load of ``bench decisions`` and ``bench
mixed``.

Requests are built before the clock starts (the load generator must not compete with the
worker for the CPU while it is measured); only ``ts`` is filled in at send. Latency is
taken on one clock, this process's, from the request handed to the producer to its
decision read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings


def request_body(request_id: str, user_id: str, candidates: list[str], ts: int) -> bytes:
    """One ``ad-requests`` message as every bench sends it: the feed placement, a mobile
    context, the candidates named."""
    return json.dumps({
        "request_id": request_id, "user_id": user_id, "placement": "feed", "ts": ts,
        "context": {"device": "mobile"}, "candidates": candidates,
    }).encode()  # fmt: skip


def pick(rng: np.random.Generator, ad_ids: Sequence[str], k: int) -> list[str]:
    """``k`` distinct ads of ``ad_ids`` at random."""
    return [ad_ids[c] for c in rng.choice(len(ad_ids), k, replace=False)]


@dataclass(frozen=True)
class PoissonRequests:
    """``n`` requests for users ``u0..``, each naming ``candidates`` of the ads."""

    prefix: str  # request ids are prefix + index
    arrivals: np.ndarray  # seconds from the start of the offer, one per request
    bodies: list[list[bytes]]  # each request's JSON split where its "ts" goes
    keys: list[bytes]

    @classmethod
    def build(
        cls, rng: np.random.Generator, rate: float, duration_s: float, users: int,
        ad_ids: list[str], candidates: int, prefix: str,
    ) -> PoissonRequests:  # fmt: skip
        n = int(rate * duration_s)
        arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
        user_no = rng.integers(0, users, n)
        bodies = [
            request_body(f"{prefix}{i}", f"u{user_no[i]}", pick(rng, ad_ids, candidates), 0)
            .split(b'"ts": 0', 1)
            for i in range(n)
        ]
        keys = [f"u{u}".encode() for u in user_no.tolist()]
        return cls(prefix, arrivals, bodies, keys)

    def __len__(self) -> int:
        return len(self.bodies)

    async def offer(
        self, producer: AIOKafkaProducer, topic: str, start: float,
        sent: dict[str, tuple[float, int]],
    ) -> float:  # fmt: skip
        """Send each request at its arrival time after ``start`` (``time.perf_counter``),
        noting in ``sent`` when and which; returns the seconds the offer took."""
        i, n = 0, len(self)
        while i < n:
            delay = start + self.arrivals[i] - time.perf_counter()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            ts = b'"ts": %d' % int(time.time() * 1000)
            while i < n and start + self.arrivals[i] <= time.perf_counter():
                head, tail = self.bodies[i]
                sent[f"{self.prefix}{i}"] = (time.perf_counter(), i)
                await producer.send(topic, head + ts + tail, key=self.keys[i])
                i += 1
        return time.perf_counter() - start


@contextlib.asynccontextmanager
async def decision_clients(
    s: Settings, fetch_max_wait_ms: int = 2
) -> AsyncIterator[tuple[AIOKafkaConsumer, AIOKafkaProducer]]:
    """A producer for requests and a consumer of ``ad-decisions`` from its current end
    (every partition's position resolved, so no decision made from now on is missed)."""
    consumer = AIOKafkaConsumer(
        **client_kwargs(s), enable_auto_commit=False, fetch_max_wait_ms=fetch_max_wait_ms
    )
    producer = AIOKafkaProducer(**client_kwargs(s), linger_ms=1, acks=1)
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(s.topic("ad-decisions"), p) for p in range(s.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        yield consumer, producer
    finally:
        await consumer.stop()
        await producer.stop()
