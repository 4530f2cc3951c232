"""``adpulse bench decisions``: end-to-end decision latency of one worker under Poisson load.

Setup: a synthetic catalog, ``users`` users with warm interest vectors (their
events applied first), one ``adpulse worker``. Then ad requests arrive as a
Poisson process at ``rate``/s for ``duration_s`` seconds, each naming
``candidates`` ads. Latency is measured from the moment a request is handed to
the producer to the moment its decision is read back from ad-decisions, on one
clock (this process), so it includes both Kafka hops, the worker's batching,
feature assembly, scoring and the strategy. Repeated ``repeats`` times against
the same worker; medians with min/max are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from adpulse.bench import machine, machine_line, percentiles_ms, spread
from adpulse.bench.features import _applied, _produce
from adpulse.catalogtool import publish, synthetic_ads
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from adpulse.workload import Workload, WorkloadModel
from streams.runtime.topicadmin import create_topics


@dataclass(frozen=True)
class DecisionsBench:
    rate: float = 1000.0
    duration_s: float = 20.0
    repeats: int = 3
    users: int = 10_000
    candidates: int = 100
    ads: int = 2_000
    warm_events: int = 100_000

    @classmethod
    def smoke(cls) -> DecisionsBench:
        return cls(rate=100.0, duration_s=2.0, repeats=1, users=100, ads=200, warm_events=1_000)


@dataclass(frozen=True)
class Warm:
    """A worker on fresh topics, with a synthetic catalog and warm interest vectors."""

    settings: Settings
    worker: WorkerProcess
    ads: list[dict[str, Any]]
    warm_values: list[bytes]  # the user-events payloads that warmed it
    workload: Workload


@contextlib.contextmanager
def warm_worker(base: Settings, users: int, ads: int, warm_events: int) -> Iterator[Warm]:
    """The set-up every decision benchmark shares (``bench decisions``, ``bench serve``)."""
    tag = uuid.uuid4().hex[:8]
    workload = Workload(WorkloadModel(), users=users, seed=2)
    with tempfile.TemporaryDirectory(prefix="adpulse-bench-") as tmp:
        s = base.with_(
            topic_prefix=f"bench-{tag}.", app_id=f"bench-{tag}",
            data_dir=Path(tmp) / "data", session_timeout_s=6.0,
        )  # fmt: skip
        create_topics(s)
        category_ids = workload.columns(50_000)["category"].tolist()
        catalog = synthetic_ads(ads, category_ids, seed=3)
        publish(s, s.topic("ad-catalog"), catalog)
        keys, values = workload.payloads(warm_events, int(time.time() * 1000), prefix="warm")
        asyncio.run(_produce(s, s.topic("user-events"), keys, values))
        worker = WorkerProcess(s, Path(tmp)).start()
        try:
            worker.wait_until(lambda: _applied(worker) >= warm_events, 300, "warm interest vectors")
            yield Warm(s, worker, catalog, values, workload)
        finally:
            worker.stop()


def run(base: Settings, cfg: DecisionsBench, log: Any = print) -> dict[str, Any]:
    with warm_worker(base, cfg.users, cfg.ads, cfg.warm_events) as warm:
        s, worker = warm.settings, warm.worker
        ad_ids = [a["ad_id"] for a in warm.ads]
        runs = []
        for r in range(cfg.repeats):
            gc.collect()
            gc.freeze()  # this process's collector pauses are not the worker's latency
            log(f"  repeat {r + 1}/{cfg.repeats}: offering {cfg.rate:g} requests/s for "
                f"{cfg.duration_s:g} s (worker pid {worker.proc.pid if worker.proc else '?'})")
            try:
                runs.append(asyncio.run(_offer(s, cfg, ad_ids, r)))
            finally:
                gc.unfreeze()
            one = runs[-1]
            log(
                f"  repeat {r + 1}/{cfg.repeats}: {one['achieved_per_s']:,.0f} decisions/s, "
                f"p50 {one['p50']:.2f} ms, p99 {one['p99']:.2f} ms, p99.9 {one['p999']:.2f} ms "
                f"(in the worker: p99 {one['worker_p99']:.2f} ms)"
            )
    p50, p99, p999, ach = (spread([x[k] for x in runs]) for k in ("p50", "p99", "p999",
                                                                 "achieved_per_s"))  # fmt: skip
    return {
        "offered_per_s": cfg.rate,
        "achieved_per_s": ach["median"],
        "latency_p50_ms": p50["median"],
        "latency_p99_ms": p99["median"],
        "latency_p999_ms": p999["median"],
        "latency_p99_ms_spread": p99,
        "worker_latency_p99_ms": spread([x["worker_p99"] for x in runs])["median"],
        "achieved_per_s_spread": ach,
        # Repeats run one after another on one worker: minutes in the worker's time order.
        "latency_p99_per_minute_ms": [m for x in runs for m in x["per_minute_p99"]],
        "candidates": cfg.candidates,
        "requests": sum(x["requests"] for x in runs),
        "lost": sum(x["lost"] for x in runs),
        "repeats": cfg.repeats,
        "duration_s": cfg.duration_s,
        "users": cfg.users,
        "ads": cfg.ads,
        "machine": machine(),
    }


def per_minute_p99(
    sent_at: list[float], latencies: list[float], duration_s: float
) -> list[float]:
    """p99 (ms) of the requests sent in each whole minute of a ``duration_s`` run; a
    partial last minute is left out (it would compare fewer requests)."""
    if not latencies:
        return []
    minute = (np.asarray(sent_at) // 60).astype(int)
    lat = np.asarray(latencies)
    whole = int(duration_s // 60)
    return [float(np.percentile(lat[minute == m], 99) * 1000) for m in range(whole)
            if (minute == m).any()]  # fmt: skip


def result_line(res: dict[str, Any]) -> str:
    return (
        f"decisions: offered {res['offered_per_s']:,.0f}/s x {res['candidates']} candidates, "
        f"achieved {res['achieved_per_s']:,.0f}/s; latency p50 {res['latency_p50_ms']:.2f} ms "
        f"p99 {res['latency_p99_ms']:.2f} ms (range {res['latency_p99_ms_spread']['min']:.2f}"
        f"-{res['latency_p99_ms_spread']['max']:.2f}) p99.9 {res['latency_p999_ms']:.2f} ms; "
        f"{res['lost']} lost; {_minutes(res)}{machine_line(res['machine'])}"
    )


def _minutes(res: dict[str, Any]) -> str:
    per_min = res.get("latency_p99_per_minute_ms") or []
    if len(per_min) < 2:
        return ""
    shown = " ".join(f"{m:.1f}" for m in per_min)
    return f"p99 per minute {shown} ms (last/second {per_min[-1] / per_min[1]:.2f}x); "


async def _offer(
    s: Settings, cfg: DecisionsBench, ad_ids: list[str], run_no: int
) -> dict[str, Any]:
    rng = np.random.default_rng(100 + run_no)
    n = int(cfg.rate * cfg.duration_s)
    arrivals = np.cumsum(rng.exponential(1.0 / cfg.rate, n))
    users = rng.integers(0, cfg.users, n)
    # Requests are built before the clock starts: the load generator must not compete
    # with the worker for the CPU while it is measured. Only "ts" is filled in at send.
    prefix = f"r{run_no}-"
    bodies = []
    for i in range(n):
        cands = [ad_ids[c] for c in rng.choice(len(ad_ids), cfg.candidates, replace=False)]
        bodies.append(json.dumps({
            "request_id": f"{prefix}{i}", "user_id": f"u{users[i]}", "placement": "feed",
            "ts": 0, "context": {"device": "mobile"}, "candidates": cands,
        }).encode().split(b'"ts": 0', 1))  # fmt: skip
    keys = [f"u{u}".encode() for u in users.tolist()]
    consumer = AIOKafkaConsumer(**client_kwargs(s), enable_auto_commit=False, fetch_max_wait_ms=2)
    producer = AIOKafkaProducer(**client_kwargs(s), linger_ms=1, acks=1)
    await consumer.start()
    await producer.start()
    sent: dict[str, float] = {}
    latencies: list[float] = []
    sent_at: list[float] = []  # when each measured request was sent, from the run's start
    in_worker: list[float] = []  # the decision's own latency_ms: request record -> decision sent
    received_at: list[float] = []  # when each decision arrived, from the run's start
    try:
        topic = s.topic("ad-decisions")
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)

        async def watch() -> None:
            while len(latencies) < n:
                batch = await consumer.getmany(timeout_ms=100)
                now = time.perf_counter()
                for records in batch.values():
                    for rec in records:
                        decision = json.loads(rec.value)
                        t = sent.pop(decision["request_id"], None)
                        if t is not None:
                            latencies.append(now - t)
                            sent_at.append(t - start)
                            received_at.append(now - start)
                            in_worker.append(decision["latency_ms"] / 1000)

        topic = s.topic("ad-requests")
        start = time.perf_counter()
        watcher = asyncio.create_task(watch())
        i = 0
        while i < n:
            delay = start + arrivals[i] - time.perf_counter()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            ts = b'"ts": %d' % int(time.time() * 1000)
            while i < n and start + arrivals[i] <= time.perf_counter():
                head, tail = bodies[i]
                sent[f"{prefix}{i}"] = time.perf_counter()
                await producer.send(topic, head + ts + tail, key=keys[i])
                i += 1
        offered_s = time.perf_counter() - start
        try:
            await asyncio.wait_for(watcher, timeout=30)
        except TimeoutError:
            watcher.cancel()
        p50, p99, p999 = percentiles_ms(latencies, [50, 99, 99.9])
        (worker_p99,) = percentiles_ms(in_worker, [99])
        return {
            "requests": n, "lost": n - len(latencies), "p50": p50, "p99": p99, "p999": p999,
            "worker_p99": worker_p99,
            "per_minute_p99": per_minute_p99(sent_at, latencies, cfg.duration_s),
            # decisions that arrived while requests were being offered: a backlog drained
            # after the offer window is not throughput at the offered rate
            "achieved_per_s": sum(r <= offered_s for r in received_at) / max(offered_s, 1e-9),
        }  # fmt: skip
    finally:
        await consumer.stop()
        await producer.stop()
