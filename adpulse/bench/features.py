"""``adpulse bench features``: interest-feature throughput and freshness of one worker.

First freshness, on a fresh worker and topics, at a fixed offered load: events
are produced at ``rate``/s and the changelog of the interest table is watched;
an event is fresh when a changelog record shows its user's counters include it.
Freshness = that moment - the moment the event was handed to the producer, so
it spans produce, fetch, the batch, the RocksDB write and the
changelog write, an upper bound on when the vector became readable.

Then, per repeat, on fresh topics: N Taobao-shaped events are produced, then
  * the baseline, a bare aiokafka consume -> produce loop with no processing,
    moves the same N messages (the transport's ceiling), and
  * a fresh ``adpulse worker`` process consumes the same N messages into its
    interest table; its rate is read off its own counters.
"""

from __future__ import annotations

import asyncio
import gc
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from adpulse.bench import machine, machine_line, percentiles_ms, spread
from adpulse.bench.freshness import ChangelogFreshness
from adpulse.bench.warm import applied, fresh_settings, produce
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.privacy import Pseudonymiser
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from adpulse.workload import Workload, WorkloadModel, fit_taobao


@dataclass(frozen=True)
class FeaturesBench:
    events: int = 200_000
    repeats: int = 3
    rate: float = 5_000.0
    duration_s: float = 10.0
    users: int = 10_000
    taobao: Path | None = None

    @classmethod
    def smoke(cls, taobao: Path | None = None) -> FeaturesBench:
        return cls(events=3_000, repeats=1, rate=500.0, duration_s=2.0, users=200, taobao=taobao)


def run(base: Settings, cfg: FeaturesBench, log: Any = print) -> dict[str, Any]:
    model = fit_taobao(cfg.taobao) if cfg.taobao and cfg.taobao.is_file() else WorkloadModel()
    workload = Workload(model, users=cfg.users, seed=1)
    worker_rates, base_rates, ratios, base_read = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="adpulse-bench-") as tmp:
        # Freshness first, on its own fresh worker and topics, at the offered rate.
        s = fresh_settings(base, Path(tmp))
        worker = WorkerProcess(s, Path(tmp), name="worker-freshness").start()
        gc.collect()
        gc.freeze()  # the benchmark's own collector pauses must not count as worker latency
        try:
            fresh = asyncio.run(_freshness(worker.settings, workload, cfg, log))
        finally:
            gc.unfreeze()
            worker.stop()
        for r in range(cfg.repeats):
            s = fresh_settings(base, Path(tmp))
            keys, values = workload.payloads(cfg.events, int(time.time() * 1000), prefix=s.app_id)
            asyncio.run(produce(s, s.topic("user-events"), keys, values))
            read, baseline = asyncio.run(_bare_loop(s, cfg.events))
            base_read.append(read)
            worker = WorkerProcess(s, Path(tmp), name=f"worker-{s.app_id}").start()
            try:
                rate = _worker_rate(worker, cfg.events)
            finally:
                worker.stop()
            worker_rates.append(rate)
            base_rates.append(baseline)
            ratios.append(rate / baseline)
            log(
                f"  repeat {r + 1}/{cfg.repeats}: worker {rate:,.0f} events/s, "
                f"bare aiokafka loop {baseline:,.0f} events/s, ratio {rate / baseline:.2f}"
            )
            if math.isnan(rate):
                log(f"  repeat {r + 1}/{cfg.repeats}: the worker had applied all {cfg.events:,} "
                    "events by its counter's first look, so there is no interval to time; "
                    "use more (--events 100000 or more)")  # fmt: skip
    p50, p99 = percentiles_ms(fresh, [50, 99])
    w, b, q = spread(worker_rates), spread(base_rates), spread(ratios)
    return {
        "events": cfg.events,
        "repeats": cfg.repeats,
        "events_per_s": w["median"],
        "baseline_events_per_s": b["median"],
        "ratio": q["median"],
        "events_per_s_spread": w,
        "baseline_events_per_s_spread": b,
        "baseline_events_read": base_read,  # per repeat: what each baseline rate timed
        "ratio_spread": q,
        "freshness_p50_ms": p50,
        "freshness_p99_ms": p99,
        "freshness_offered_per_s": cfg.rate,
        "freshness_samples": len(fresh),
        "users": cfg.users,
        "machine": machine(),
    }


def result_line(res: dict[str, Any]) -> str:
    return (
        f"features: {res['events_per_s']:,.0f} events/s per worker "
        f"(median of {res['repeats']}, range {res['events_per_s_spread']['min']:,.0f}"
        f"-{res['events_per_s_spread']['max']:,.0f}); bare aiokafka loop "
        f"{res['baseline_events_per_s']:,.0f}/s; ratio {res['ratio']:.2f}; freshness at "
        f"{res['freshness_offered_per_s']:,.0f} events/s p50 {res['freshness_p50_ms']:.1f} ms "
        f"p99 {res['freshness_p99_ms']:.1f} ms; {machine_line(res['machine'])}"
    )


async def _create_topic(s: Settings, name: str) -> None:
    admin = AIOKafkaAdminClient(**client_kwargs(s))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, s.partitions, s.replication)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def _bare_loop(s: Settings, n: int) -> tuple[int, float]:
    """Consume n messages and produce each to a sink topic: no decoding, no state.
    Returns the messages read and their rate."""
    consumer = AIOKafkaConsumer(
        **client_kwargs(s), enable_auto_commit=False, fetch_max_wait_ms=10,
        max_partition_fetch_bytes=16 << 20, auto_offset_reset="earliest",
    )  # fmt: skip
    producer = AIOKafkaProducer(**client_kwargs(s), linger_ms=5, max_batch_size=1 << 20)
    topic, sink = s.topic("user-events"), s.topic("bench-sink")
    await _create_topic(s, sink)  # brokers like production's create no topic on first use
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, started, futures = 0, 0.0, []
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if batch and not started:
                started = time.perf_counter()
            for records in batch.values():
                for rec in records:
                    futures.append(await producer.send(sink, rec.value, key=rec.key))
                seen += len(records)
        await asyncio.gather(*futures)
        return seen, n / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


def _worker_rate(worker: WorkerProcess, n: int, timeout: float = 300.0) -> float:
    """Events/s between the first and the last look at the worker's counters."""
    deadline = time.monotonic() + timeout
    first: tuple[float, float] | None = None
    while time.monotonic() < deadline:
        done = applied(worker)
        now = time.perf_counter()
        if first is None and done > 0:
            first = (now, done)
        if done >= n:
            assert first is not None
            if done == first[1]:  # all of it in one batch: no interval to measure
                return float("nan")
            return (done - first[1]) / (now - first[0])
        time.sleep(0.01)
    msg = f"worker did not apply {n} events within {timeout:.0f}s"
    raise TimeoutError(msg)


async def _freshness(s: Settings, workload: Workload, cfg: FeaturesBench, log: Any) -> list[float]:
    watch = ChangelogFreshness(s)
    producer = AIOKafkaProducer(**client_kwargs(s), linger_ms=1, acks=1)
    await watch.start()
    await producer.start()
    try:
        total = int(cfg.rate * cfg.duration_s)
        keys, values = workload.payloads(total, int(time.time() * 1000), prefix="fresh-")
        keys = [b"f" + k for k in keys]
        values = [v.replace(b'"user_id":"', b'"user_id":"f', 1) for v in values]
        # The changelog is keyed by pseudonym (the worker's key: the same settings).
        pseudonym = Pseudonymiser.from_settings(s)
        state_keys = [pseudonym(k.decode()).encode() for k in keys]
        watcher = asyncio.create_task(watch.watch(total))
        tick, start = 0.01, time.perf_counter()
        per_tick = cfg.rate * tick
        i = 0
        while i < total:
            due = int((time.perf_counter() - start) / tick * per_tick) + 1
            for _ in range(min(due, total) - i):
                watch.mark(state_keys[i])
                await producer.send(s.topic("user-events"), values[i], key=keys[i])
                i += 1
            await asyncio.sleep(tick)
        try:
            await asyncio.wait_for(watcher, timeout=30)
        except TimeoutError:
            log(f"  freshness: only {len(watch.fresh)} of {total} events seen in the changelog")
        return watch.fresh
    finally:
        await watch.stop()
        await producer.stop()
