"""Poison-message policy: a message we cannot use becomes a dead letter, never an exception.

The dead letter carries the original bytes (base64), where they came from
(topic, partition, offset) and why they were refused, so an operator can fix
the producer and replay them. Payloads too large to fit in a dead letter are
cut, and the cut is said in the message, so dead-lettering itself cannot fail
on size.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Keep a dead letter well under Kafka's default 1 MB message limit after base64.
MAX_KEPT_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Raw:
    """One consumed message: what a dead letter must carry to be replayable."""

    value: bytes | None
    key: bytes | None
    partition: int
    offset: int
    timestamp_ms: int = 0  # the record's Kafka timestamp (create or log-append time)
    # Broker time: the record's LogAppendTime where its topic has one, else when this
    # worker fetched it; -1: not known (the reader uses its own clock). Abuse rules count
    # by it, never by a client's ``ts`` (scoring/abuse.py).
    broker_ms: int = -1


@dataclass(frozen=True, slots=True)
class Rejected:
    raw: Raw
    reason: str  # a metric label: snake_case, from a small fixed set per stage
    message: str  # one line for a human


def dead_letter(rej: Rejected, topic: str, now_ms: int, stage: str) -> dict[str, Any]:
    """The dead-letters message for a rejected input (schemas/dead-letters.schema.json)."""
    raw = rej.raw
    value = raw.value or b""
    message = rej.message
    if len(value) > MAX_KEPT_BYTES:
        message = f"{message} [payload cut to its first {MAX_KEPT_BYTES} of {len(value)} bytes]"
        value = value[:MAX_KEPT_BYTES]
    return {
        "payload_b64": base64.b64encode(value).decode(),
        "key_b64": None if raw.key is None else base64.b64encode(raw.key[:1024]).decode(),
        "topic": topic,
        "partition": raw.partition,
        "offset": raw.offset,
        "error": rej.reason,
        "message": message[:1000],
        "ts": now_ms,
        "stage": stage,
    }


# How a stage reads its table: values of keys, each on its partition (None: absent).
# Stages get it as an argument, so they stay pure and the I/O stays in pipeline.py.
Loader = Callable[[Sequence[bytes], Sequence[int]], list[bytes | None]]
