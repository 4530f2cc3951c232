"""``adpulse forget``: ask the workers to delete one user's state, and optionally wait.

The request goes to ``forget-requests`` keyed by the raw user id, so it lands on
the user's partition; the worker owning it deletes the user's records by
tombstones (streams/forget.py) and answers on ``forget-confirmations``, on the
same partition number, once every tombstone is acknowledged.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from adpulse.core.errors import AdpulseError
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings


class NotConfirmed(AdpulseError):
    """No worker confirmed a forget request in time: is a worker running on these topics?"""

    exit_code = 7


def request_forget(
    settings: Settings, user_id: str, *, reason: str = "", wait_s: float = 0.0
) -> tuple[str, int, dict[str, Any] | None]:
    """Send one forget request; (request id, partition, confirmation or None when not waiting)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: PLC0415 - slow

    request_id = f"forget-{uuid.uuid4().hex[:16]}"
    body: dict[str, Any] = {"request_id": request_id, "user_id": user_id}
    body["ts"] = int(time.time() * 1000)
    if reason:
        body["reason"] = reason
    confirmations = settings.topic("forget-confirmations")
    consumer = None
    if wait_s > 0:  # positions taken before the request: its answer comes after them
        consumer = KafkaConsumer(
            **client_kwargs(settings), enable_auto_commit=False, fetch_max_wait_ms=50
        )
        parts = consumer.partitions_for_topic(confirmations) or set()
        tps = [TopicPartition(confirmations, p) for p in sorted(parts)]
        if not tps:
            consumer.close()
            msg = f"topic {confirmations} does not exist: run `adpulse topics create`"
            raise NotConfirmed(msg)
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
    producer = KafkaProducer(**client_kwargs(settings), acks="all")
    try:
        sent = producer.send(
            settings.topic("forget-requests"),
            key=user_id.encode(),
            value=json.dumps(body).encode(),
        ).get(timeout=30)
    finally:
        producer.close()
    if consumer is None:
        return request_id, sent.partition, None
    try:
        tp = TopicPartition(confirmations, sent.partition)
        consumer.assign([tp])
        consumer.seek(tp, ends[tp])
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    if r.key == request_id.encode():
                        return request_id, sent.partition, json.loads(r.value)
    finally:
        consumer.close()
    msg = f"no confirmation of {request_id} within {wait_s:g}s: is a worker running?"
    raise NotConfirmed(msg)
