"""Seal changelog partitions on the embedded broker before a table recovers from them.

tansu answers ListOffsets(latest) with the last *batch's* base offset + 1, not
the last offset + 1. Faust stops recovery at that "highwater", so when the last
changelog batch held several records, the newest table writes were not
restored (measured: 2 of 20,000 counts lost). Appending one single-record
tombstone with a sentinel key to each partition makes the last batch one record
long, so the reported end is exact again, and replaying the tombstone deletes a
key that never holds data.

Only for the embedded broker (``ADPULSE_EMBEDDED_BROKER``): Apache Kafka reports
end offsets correctly and needs none of this.
"""

from __future__ import annotations

from collections.abc import Iterable

from adpulse.core.kafkaconf import client_kwargs

SEAL_KEY = b"\x00adpulse-seal"


def is_seal(key: bytes | None) -> bool:
    return key == SEAL_KEY


def seal_changelogs(bootstrap: str, topics: Iterable[str]) -> int:
    """Append one sentinel tombstone per partition of each topic; returns how many were sent.

    Each tombstone is sent and acknowledged on its own so the broker stores it
    as a batch of one. Topics that do not exist yet are skipped: nothing to
    recover from.
    """
    from kafka import KafkaAdminClient, KafkaProducer  # noqa: PLC0415 - embedded broker only

    admin = KafkaAdminClient(**client_kwargs(bootstrap), client_id="adpulse-seal")
    try:
        wanted = set(topics) & set(admin.list_topics())
        described = admin.describe_topics(sorted(wanted)) if wanted else []
    finally:
        admin.close()
    targets = [(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
    if not targets:
        return 0
    producer = KafkaProducer(**client_kwargs(bootstrap), linger_ms=0, acks=1)
    try:
        for topic, partition in sorted(targets):
            producer.send(topic, key=SEAL_KEY, value=None, partition=partition).get(timeout=10)
    finally:
        producer.close()
    return len(targets)
