"""Gauges sampled on a timer, off the hot paths: consumer lag and table sizes.

Both read what the worker already knows (the consumer's last fetched high
watermarks and read positions, RocksDB's own key estimate), so a sample costs
microseconds and asks the broker nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from adpulse.metrics import Metrics

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
    batch_topics = getattr(app, "batch_handlers", {})
    seen: set[tuple[str, str]] = set()
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        read = consumer._read_offset.get(tp)
        if highwater is None or read is None:
            continue
        # The batch path stores the next offset to read; Faust's own path the last one read.
        position = read if tp.topic in batch_topics else read + 1
        labels = (tp.topic, str(tp.partition))
        metrics.consumer_lag.labels(*labels).set(max(0, highwater - position))
        seen.add(labels)
    for labels in labelled - seen:
        metrics.consumer_lag.remove(*labels)
    labelled.clear()
    labelled.update(seen)


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
