"""The Faust app: topics, tables and wiring only; the stages hold the logic.

``create_app(settings)`` builds a worker's app; the module-level ``app`` (from
the environment) is what ``faust -A streams.app worker`` and ``adpulse worker``
run.
"""

from __future__ import annotations

import logging
from typing import Any

from faust.types import TableT

from adpulse.core.kafkaconf import (
    client_kwargs,
    faust_credentials,
    fetch_wait_ms,
    on_embedded_tansu,
)
from adpulse.core.metrics import Metrics
from adpulse.core.privacy import Pseudonymiser
from adpulse.core.settings import Settings
from schemas.topics import TOPICS
from streams import pipeline, web
from streams.adtext import AdTextEmbedder
from streams.catalogmirror import TopicMirror, catalog_mirror
from streams.items import ItemCache, item_mirror
from streams.runtime.consumer import BatchApp
from streams.runtime.restore import SealingTableManager
from streams.wiring import Wiring

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Wiring:
    pseudonyms = Pseudonymiser.from_settings(settings, warn=True)  # no key: ConfigError
    app = BatchApp(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap_or_default}",
        broker_credentials=faust_credentials(settings),
        store="rocksdb://",
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_s / 6),
        broker_max_poll_records=10_000,
        consumer_max_fetch_size=16 * 1024 * 1024,
        # The worker's one producer carries changelogs, decisions, ctr-feedback and dead
        # letters: a short linger keeps decisions fast, a large batch keeps bursts of
        # changelog writes in few requests (docs/guarantees.md, "Producers").
        producer_linger=settings.producer_linger_ms / 1000,
        producer_max_batch_size=settings.producer_batch_bytes,
        producer_acks=-1,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        canonical_url=settings.canonical_url or f"http://{settings.web_host}:{settings.web_port}",
        TableManager=SealingTableManager,
        batch_max=settings.batch_max_events,
        batch_within=settings.batch_max_wait_s,
        fetch_max_wait_ms=fetch_wait_ms(settings),
        slice_ms=settings.batch_slice_ms,
        # Only tansu reports short end offsets (streams/runtime/seal.py); Kafka needs no seal.
        seal_changelogs=on_embedded_tansu(settings),
        # streams/runtime/restore.py: the aiokafka client that reads changelog backlogs in bulk.
        bulk_restore_client=client_kwargs(settings) if settings.bulk_restore else None,
    )
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }

    # bytes key/value types give tables raw serializers: values are packed records.
    def table(name: str, help_: str) -> TableT[bytes, bytes]:
        return app.Table(
            name, partitions=settings.partitions, key_type=bytes, value_type=bytes, help=help_
        )

    # Every worker reads all of ad-catalog itself (no group, so no rebalance can drop
    # records): streams/catalogmirror.py says why it is not a Faust GlobalTable.
    adtext = AdTextEmbedder.from_settings(settings)  # a tampered model: ConfigError at start
    catalog = catalog_mirror(settings, settings.dim, adtext.check if adtext else None)
    # Items in the ads' space (streams/items.py): only where titles can become vectors.
    items = None if adtext is None else ItemCache(item_mirror(settings, adtext.check), adtext,
                                                  settings)  # fmt: skip
    learn = table("learn", "ad id -> learner state (streams.learn), on the ad's partition")
    wiring = Wiring(
        settings=settings,
        app=app,
        user_events=app.topic(
            settings.topic("user-events"), config=TOPICS["user-events"].configs(), **raw
        ),
        ad_requests=app.topic(settings.topic("ad-requests"), **raw),
        ad_decisions=app.topic(settings.topic("ad-decisions"), **raw),
        ad_catalog=app.topic(settings.topic("ad-catalog"), **raw),
        dead_letters=app.topic(settings.topic("dead-letters"), **raw),
        interest=table("interest", "pseudonym -> interest state (scoring.features.state_dtype)"),
        freqcap=table("freqcap", "pseudonym -> impressions per ad today (scoring.caps)"),
        spend=table("spend", "campaign id -> spend today of this partition's budget share"),
        catalog=catalog,
        metrics=Metrics.create(),
        ctr_feedback=app.topic(settings.topic("ctr-feedback"), **raw),
        learn=learn,
        # What the decision stage reads: the learn table's changelog, mirrored whole.
        strategy=TopicMirror(settings, learn.changelog_topic.get_topic_name(), "strategy"),
        pending=table("pending", "decision id -> click-join state (scoring.joinstate)"),
        pseudonyms=pseudonyms,
        forget_requests=app.topic(settings.topic("forget-requests"), **raw),
        adtext=adtext,
        item_catalog=None if items is None else app.topic(settings.topic("item-catalog"), **raw),
        items=items,
        sequence=table("sequence", "pseudonym -> last behaviours (scoring.sequence)")
        if settings.sequence_length > 0
        else None,
    )

    pipeline.wire(wiring)  # the handlers register themselves on the app
    web.wire(wiring)
    return wiring


def __getattr__(name: str) -> Any:
    """``faust -A streams.app worker`` reads ``app``; build it on first use, not at import."""
    if name == "app":
        from adpulse.core.announce import recognise  # noqa: PLC0415 - on `adpulse broker`'s?

        built = create_app(recognise(Settings.from_env())).app
        globals()["app"] = built  # cached: later lookups find the attribute directly
        return built
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
