"""The Faust app: topics, tables and wiring only; the stages hold the logic.

``create_app(settings)`` builds a worker's app; the module-level ``app`` (from
the environment) is what ``faust -A streams.app worker`` and ``adpulse worker``
run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import faust
from faust.tables.manager import TableManager

from adpulse.metrics import Metrics
from adpulse.settings import Settings
from streams.consumer import BatchApp
from streams.seal import SEAL_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wiring:
    """What the stages need from the app, handed to them explicitly."""

    settings: Settings
    app: BatchApp
    user_events: faust.TopicT
    dead_letters: faust.TopicT
    interest: Any  # faust Table, raw bytes -> raw bytes (scoring.features record)
    metrics: Metrics


class SealingTableManager(TableManager):
    """On the embedded broker, seal changelogs before each recovery (see streams/seal.py)."""

    async def on_rebalance(
        self, assigned: Any, revoked: Any, newly_assigned: Any, generation_id: int = 0
    ) -> None:
        if getattr(self.app, "seal_changelogs", False):
            await _seal(self.app, self.changelog_topics)
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)


async def _seal(app: Any, topics: set[str]) -> None:
    producer = app.producer
    for topic in sorted(topics):
        partitions = app.consumer.topic_partitions(topic) or 0
        for p in range(partitions):
            # One record, awaited alone: the broker stores it as a batch of one.
            fut = await producer.send(topic, SEAL_KEY, None, p, None, None)
            await fut
    log.info("sealed %d changelog topic(s) before recovery", len(topics))


def create_app(settings: Settings) -> Wiring:
    app = BatchApp(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap_or_default}",
        store="rocksdb://",
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_s / 6),
        broker_max_poll_records=10_000,
        consumer_max_fetch_size=16 * 1024 * 1024,
        producer_linger_ms=1,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        TableManager=SealingTableManager,
        batch_max=settings.batch_max_events,
        batch_within=settings.batch_max_wait_s,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
    app.seal_changelogs = settings.embedded_broker  # type: ignore[attr-defined]
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    user_events = app.topic(settings.topic("user-events"), **raw)
    dead_letters = app.topic(settings.topic("dead-letters"), **raw)
    # bytes key/value types give the table raw serializers: state records are packed bytes.
    interest = app.Table(
        "interest",
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        help="user id -> interest state record (scoring.features.state_dtype)",
    )
    wiring = Wiring(settings, app, user_events, dead_letters, interest, Metrics.create())

    from streams import pipeline, web  # noqa: PLC0415 - stages register themselves on the app

    pipeline.wire(wiring)
    web.wire(wiring)
    return wiring


def __getattr__(name: str) -> Any:
    """``faust -A streams.app worker`` reads ``app``; build it on first use, not at import."""
    if name == "app":
        built = create_app(Settings.from_env()).app
        globals()["app"] = built  # cached: later lookups find the attribute directly
        return built
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
