"""The set-up the benches share: topics no earlier run used, events produced in bulk, and
a worker that has applied them (with a synthetic catalog for the decision benches).

A bench measures a worker on its own fresh topics and app id, so nothing a previous
run left on the broker (offsets, changelogs, a consumer group) can flatter or slow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from adpulse.catalogtool import publish, synthetic_ads
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from adpulse.workload import Workload, WorkloadModel
from streams.runtime.topicadmin import create_topics


def fresh_settings(base: Settings, root: Path, **changes: Any) -> Settings:
    """``base`` on a new topic prefix and app id (topics created), its data under ``root``;
    a 6 s session timeout unless ``changes`` say otherwise."""
    tag = uuid.uuid4().hex[:8]
    s = base.with_(**{
        "topic_prefix": f"bench-{tag}.", "app_id": f"bench-{tag}",
        "data_dir": root / f"bench-{tag}", "session_timeout_s": 6.0, **changes,
    })  # fmt: skip
    create_topics(s)
    return s


async def produce(
    bootstrap: Settings | str, topic: str, keys: list[bytes], values: list[bytes]
) -> None:
    """Send every record, batched for speed, and wait until all are acknowledged."""
    producer = AIOKafkaProducer(
        **client_kwargs(bootstrap), linger_ms=5, max_batch_size=1 << 20, acks=1
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=k) for k, v in zip(keys, values, strict=True)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def applied(worker: WorkerProcess) -> float:
    """user-events the worker has consumed, off its own counter."""
    return worker.metric("adpulse_events_total")


@contextlib.contextmanager
def loaded_worker(
    s: Settings,
    root: Path,
    keys: list[bytes],
    values: list[bytes],
    *,
    catalog: list[dict[str, Any]] | None = None,
    timeout: float = 300.0,
    what: str = "warm interest vectors",
    name: str = "worker",
) -> Iterator[WorkerProcess]:
    """A worker on ``s`` that has applied these user-events (and has ``catalog``'s ads
    published before it starts); stopped on exit."""
    if catalog is not None:
        publish(s, s.topic("ad-catalog"), catalog)
    asyncio.run(produce(s, s.topic("user-events"), keys, values))
    worker = WorkerProcess(s, root, name=name).start()
    try:
        worker.wait_until(lambda: applied(worker) >= len(keys), timeout, what)
        yield worker
    finally:
        worker.stop()


@dataclass(frozen=True)
class Warm:
    """A worker on fresh topics, with a synthetic catalog and warm interest vectors."""

    settings: Settings
    worker: WorkerProcess
    ads: list[dict[str, Any]]
    warm_values: list[bytes]  # the user-events payloads that warmed it
    workload: Workload


@contextlib.contextmanager
def warm_worker(
    base: Settings, users: int, ads: int, warm_events: int, seed: int = 2
) -> Iterator[Warm]:
    """The set-up of the decision benches (``bench decisions``, ``serve``, ``mixed``)."""
    workload = Workload(WorkloadModel(), users=users, seed=seed)
    with tempfile.TemporaryDirectory(prefix="adpulse-bench-") as tmp:
        s = fresh_settings(base, Path(tmp))
        catalog = synthetic_ads(ads, workload.columns(50_000)["category"].tolist(), seed=3)
        keys, values = workload.payloads(warm_events, int(time.time() * 1000), prefix="warm")
        with loaded_worker(s, Path(tmp), keys, values, catalog=catalog) as worker:
            yield Warm(s, worker, catalog, values, workload)
