"""Create every adpulse topic from the contract in ``schemas.topics`` and the settings.

Idempotent: a topic that exists is reported, not an error, so ``adpulse topics
create`` can run before every deploy. Partition counts come from one setting so
that ``user-events`` and ``ad-requests`` stay co-partitioned by user id.
"""

from __future__ import annotations

from dataclasses import dataclass

from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.probe import wait_for_broker
from adpulse.core.settings import Settings
from schemas.topics import TOPICS


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int
    configs: dict[str, str]


def plan(settings: Settings) -> list[TopicPlan]:
    """The topics this deployment needs, with their Kafka configs."""
    out = []
    for spec in TOPICS.values():
        configs = {"cleanup.policy": "compact" if spec.compacted else "delete"}
        configs["retention.ms"] = str(spec.retention_ms if spec.retention_ms is not None else -1)
        configs.update(spec.configs())
        out.append(TopicPlan(settings.topic(spec.name), settings.partitions, configs))
    return out


def create_topics(settings: Settings, timeout_s: float = 10.0) -> list[tuple[str, str]]:
    """Create what is missing; returns (topic, "created" | "exists") per planned topic."""
    from kafka.admin import KafkaAdminClient, NewTopic  # noqa: PLC0415 - slow import
    from kafka.errors import TopicAlreadyExistsError  # noqa: PLC0415

    wait_for_broker(settings, timeout=timeout_s)
    admin = KafkaAdminClient(**client_kwargs(settings), client_id="adpulse-topics")
    try:
        existing = set(admin.list_topics())
        results = []
        for topic in plan(settings):
            if topic.name in existing:
                results.append((topic.name, "exists"))
                continue
            new = NewTopic(
                topic.name,
                num_partitions=topic.partitions,
                replication_factor=settings.replication,
                topic_configs=topic.configs,
            )
            try:
                admin.create_topics([new], timeout_ms=int(timeout_s * 1000))
                results.append((topic.name, "created"))
            except TopicAlreadyExistsError:
                results.append((topic.name, "exists"))
        return results
    finally:
        admin.close()
