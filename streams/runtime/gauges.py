"""Gauges sampled on a timer, off the hot paths: consumer lag, table sizes, broker reach.

Both read what the worker already knows (the consumer's last fetched high
watermarks and read positions, RocksDB's own key estimate), so a sample costs
microseconds and asks the broker nothing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

from faust.exceptions import ConsumerNotStarted

from adpulse.core.metrics import Metrics
from adpulse.core.probe import metadata_answers
from adpulse.core.settings import Settings
from streams.runtime.consumer import read_position

log = logging.getLogger(__name__)
SAMPLE_S = 5.0  # how often the timers in streams/pipeline.py sample


def sample_consumer_lag(app: Any, metrics: Metrics, labelled: set[tuple[str, str]]) -> None:
    """Set ``adpulse_consumer_lag_messages`` for every assigned partition read so far.

    The high watermark is the one the last fetch of that partition reported, so
    lag can read short by one fetch (more on the embedded broker, which answers
    a fetch with what it had when the fetch arrived). Partitions no longer
    assigned lose their series; ``labelled`` remembers which ones were set.
    """
    consumer = app.consumer
    seen: set[tuple[str, str]] = set()
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        position = read_position(app, tp)
        if highwater is None or position is None:
            continue
        labels = (tp.topic, str(tp.partition))
        metrics.consumer_lag.labels(*labels).set(max(0, highwater - position))
        seen.add(labels)
    for labels in labelled - seen:
        metrics.consumer_lag.remove(*labels)
    labelled.clear()
    labelled.update(seen)


def unread_changelog_partitions(app: Any) -> int:
    """Changelog partitions whose fetched records wait unread in the aiokafka client.

    Nothing reads a table's own changelog after recovery, and while any fetched records
    wait unread aiokafka sends their broker no fetch for 0.1 s (its ``prefetch_backoff``),
    so such a partition holds up every source partition on that broker. Recovery pauses
    them (streams/runtime/restore.py, ``BulkRecovery.on_recovery_completed``), so this
    stays 0; a standby's may show for an instant. Read when Prometheus scrapes, from the
    consumer thread's dict: ``list()`` of a dict copies it under the GIL.
    """
    try:
        fetcher = app.consumer._thread._ensure_consumer()._fetcher
    except ConsumerNotStarted:
        return 0
    if fetcher is None:  # the client is not started yet: nothing fetched
        return 0
    # A renamed private after an upgrade raises here, so the scrape fails loudly (and the
    # test that pins the pause), rather than reading 0 for ever.
    changelogs = set(app.tables.changelog_topics)
    return sum(1 for tp in list(fetcher._records) if tp.topic in changelogs)


def sample_table_keys(tables: Iterable[Any], metrics: Metrics) -> None:
    """Set ``adpulse_table_keys`` from RocksDB's estimate over each table's open partitions."""
    for table in tables:
        dbs = getattr(table.data, "_dbs", None)
        if dbs is None:  # not a RocksDB store (memory:// in agent tests)
            continue
        keys = 0
        for db in list(dbs.values()):
            try:
                keys += db.property_int_value("rocksdb.estimate-num-keys") or 0
            except Exception:  # a partition DB closed by a rebalance meanwhile
                log.debug("no key estimate for a partition of %s", table.name, exc_info=True)
        metrics.table_keys.labels(table.name).set(keys)


def sample_pacing(
    gauges: dict[str, tuple[float, float, float, float]], metrics: Metrics, labelled: set[str]
) -> None:
    """Set the ``adpulse_pacing_*`` gauges from the decision stage's per-campaign view.

    ``gauges`` is ``BudgetGate.gauges(now)``: campaign -> (spent, target, budget, p)
    over this worker's partitions. Campaigns gone from the catalog (or from this
    worker) lose their series; ``labelled`` remembers which ones were set.
    """
    for campaign, (spent, target, budget, p) in gauges.items():
        metrics.pacing_spend.labels(campaign).set(spent)
        metrics.pacing_target.labels(campaign).set(target)
        metrics.pacing_budget.labels(campaign).set(budget)
        metrics.pacing_participation.labels(campaign).set(p)
    for campaign in labelled - set(gauges):
        for gauge in (metrics.pacing_spend, metrics.pacing_target, metrics.pacing_budget,
                      metrics.pacing_participation):  # fmt: skip
            gauge.remove(campaign)
    labelled.clear()
    labelled.update(gauges)


PROBE_S = 1.0  # how often the broker probe runs
PROBE_TIMEOUT_S = 2.0
PROBE_FAILURES = 2  # failed probes in a row before the broker counts as unreachable


class BrokerProbe:
    """Whether the worker can reach a bootstrap broker: ``adpulse_broker_connected``, /health.

    Each probe opens a fresh connection to each bootstrap server in turn (in a
    thread, off the event loop) and sends a Kafka Metadata request; behind TLS or
    SASL the handshake belongs to the client library, so an accepted connection
    is the proof there. Two failures in a row mark the broker unreachable (one
    slow answer on a busy machine does not flap the health check); the first
    answer marks it reachable again. Both transitions are logged once.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.servers = [
            (host, int(port))
            for host, _, port in (
                s.strip().rpartition(":") for s in settings.bootstrap_or_default.split(",")
            )
            if host and port.isdigit()
        ]
        self.plaintext = getattr(settings, "security_protocol", "PLAINTEXT") == "PLAINTEXT"
        self.metrics = metrics
        self.connected = True
        self.failures = 0
        self.down_since = 0.0
        metrics.broker_connected.set(1)

    def answers(self) -> bool:
        for host, port in self.servers:
            if self.plaintext:
                if metadata_answers(host, port, timeout=PROBE_TIMEOUT_S):
                    return True
                continue
            try:
                with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                    return True
            except OSError:
                continue
        return False

    async def run(self) -> None:
        ok = await asyncio.to_thread(self.answers)
        self.failures = 0 if ok else self.failures + 1
        if ok and not self.connected:
            self.connected = True
            self.metrics.broker_connected.set(1)
            log.warning("broker reachable again after %.1f s", time.monotonic() - self.down_since)
        elif self.connected and self.failures >= PROBE_FAILURES:
            self.connected = False
            self.down_since = time.monotonic()
            self.metrics.broker_connected.set(0)
            log.error(
                "broker unreachable: no answer from %s in %d probes; /health is 503 until it "
                "answers (the consumer and producer keep retrying on their own)",
                ",".join(f"{h}:{p}" for h, p in self.servers),
                self.failures,
            )
