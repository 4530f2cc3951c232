"""Every Prometheus metric adpulse exports, as one struct built from a registry.

A fresh ``CollectorRegistry`` per worker (and per test) keeps processes and
tests from colliding. Names follow Prometheus conventions: ``adpulse_`` prefix,
``_total`` counters, base units (seconds), and labels from small fixed sets,
never a user id. Buckets are explicit because the defaults are too coarse
around the 10-50 ms targets we care about.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Fine around 1-100 ms, where the freshness and decision targets are.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 50000)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    events: Counter
    dead_letters: Counter
    batch_seconds: Histogram
    batch_events: Histogram
    freshness: Histogram
    table_writes: Counter
    newest_event_ts: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        r = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=r,
            events=Counter(
                "adpulse_events_total",
                "user-events consumed, by kind and outcome (applied, duplicate, redelivered).",
                ["kind", "outcome"],
                registry=r,
            ),
            dead_letters=Counter(
                "adpulse_dead_letters_total",
                "Messages sent to dead-letters, by source topic and reason.",
                ["topic", "reason"],
                registry=r,
            ),
            batch_seconds=Histogram(
                "adpulse_ingest_batch_seconds",
                "Time to apply one batch of user-events to the interest table.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            batch_events=Histogram(
                "adpulse_ingest_batch_events",
                "Messages per ingest batch.",
                buckets=BATCH_BUCKETS,
                registry=r,
            ),
            freshness=Histogram(
                "adpulse_freshness_seconds",
                "Per batch: age of its oldest event (produce time) when its state is written.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            table_writes=Counter(
                "adpulse_table_writes_total",
                "Keys written to a table (one per user per batch).",
                ["table"],
                registry=r,
            ),
            newest_event_ts=Gauge(
                "adpulse_newest_event_timestamp_seconds",
                "Event time of the newest event applied to the interest table.",
                registry=r,
            ),
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
