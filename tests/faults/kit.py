"""What the fault tests share: a worker with extra settings, topic readers, metric scrapes."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess

CLIENT = "fault-app"  # client id of the test's own Kafka clients (the broker-cut proxy spares it)


class Worker(WorkerProcess):
    """``adpulse worker`` with extra ADPULSE_* variables, and metric scrapes."""

    def __init__(
        self, settings: Settings, log_dir: Path, extra: dict[str, str], name: str = "worker"
    ) -> None:
        super().__init__(settings, log_dir, name=name)
        self.extra = extra

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra}

    def health(self) -> int | None:
        return self._health()


def scrape(worker: WorkerProcess, name: str, labels: str = "") -> float:
    """A metric of a worker that may be down or busy: 0 when it does not answer."""
    return worker.metric(name, labels)


class Reader:
    """Every record of one topic from the start, consumed (never counted by end offsets)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap,
            client_id=CLIENT,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        tps = [TopicPartition(settings.topic(topic), p) for p in range(settings.partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.records: list[Any] = []  # kafka ConsumerRecords, in arrival order

    def poll(self, timeout_ms: int = 100) -> int:
        got = 0
        for batch in self.consumer.poll(timeout_ms=timeout_ms, max_records=50_000).values():
            self.records.extend(batch)
            got += len(batch)
        return got

    def json_by(self, field: str) -> dict[Any, list[dict[str, Any]]]:
        """Records decoded as JSON, grouped by one field (lists, so duplicates show)."""
        out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for r in self.records:
            rec = json.loads(r.value)
            out[rec[field]].append(rec)
        return out

    def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            late = time.monotonic() > deadline  # bench-ok: a wait bound, not a speed claim
            assert not late, f"timed out after {timeout:.0f}s waiting for {what}"  # bench-ok
            self.poll()

    def close(self) -> None:
        self.consumer.close()
