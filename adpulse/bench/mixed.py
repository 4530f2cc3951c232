"""``adpulse bench mixed``: user events, ad requests and clicks offered together to one worker.

Setup as ``bench decisions``: a synthetic catalog, ``users`` users with warm
interest vectors, one ``adpulse worker``. Then, per repeat, for ``duration_s``
seconds and at the same time:
  * an events process offers ``event_rate`` user-events/s (Taobao-shaped, for
    users new to this repeat) and watches the interest changelog: an event is
    fresh when a changelog record of its user counts it (as ``bench features``);
  * a requests process offers ``request_rate`` ad requests/s (Poisson arrivals,
    ``candidates`` ads each) for the warm users, reads ad-decisions back
    (latency: request handed to the producer -> decision consumed, one clock; a
    ``shed`` no fill, the worker giving way to ingest, is counted apart, with its own p99)
    and answers a share ``ctr`` of the filled decisions with a click
    (``kind=click`` with ``decision_id`` and ``ad_id``) on user-events;
  * this process samples the worker's CPU and RSS from /proc and reads the
    events it applied off its counters.
The two generators run in their own processes, so neither is held back by the
other; each reports the rate it really offered, next to the rate asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer

from adpulse.bench import machine, machine_line, percentiles_ms, spread
from adpulse.bench.freshness import ChangelogFreshness
from adpulse.bench.requests import PoissonRequests, decision_clients
from adpulse.bench.warm import applied, warm_worker
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.privacy import Pseudonymiser
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from adpulse.workload import Workload, WorkloadModel


@dataclass(frozen=True)
class MixedBench:
    event_rate: float = 10_000.0
    request_rate: float = 1_000.0
    duration_s: float = 20.0
    repeats: int = 3
    users: int = 10_000
    candidates: int = 100
    ads: int = 2_000
    ctr: float = 0.02
    warm_events: int = 100_000

    @classmethod
    def smoke(cls) -> MixedBench:
        return cls(event_rate=300.0, request_rate=30.0, duration_s=2.0, repeats=1, users=100,
                   ads=200, ctr=0.2, warm_events=1_000)  # fmt: skip


def run(base: Settings, cfg: MixedBench, log: Any = print) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with warm_worker(base, cfg.users, cfg.ads, cfg.warm_events, seed=4) as warm:
        ad_items = {a["ad_id"]: (a["item_id"], a["category_id"]) for a in warm.ads}
        for r in range(cfg.repeats):
            runs.append(_repeat(warm.worker, cfg, ad_items, r))
            log(_repeat_line(r, cfg, runs[-1]))
    return _summary(cfg, runs)


def _repeat(
    worker: WorkerProcess, cfg: MixedBench, ad_items: dict[str, tuple[int, int]], r: int
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    ready = [ctx.Event(), ctx.Event()]
    go = ctx.Event()
    procs = [
        ctx.Process(target=_events_main, args=(worker.settings, cfg, r, ready[0], go, out)),
        ctx.Process(target=_requests_main,
                    args=(worker.settings, cfg, ad_items, r, ready[1], go, out)),
    ]  # fmt: skip
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 300  # bench-ok: wait bound for the generators' setup
        while not all(e.is_set() for e in ready):
            dead = [p for p in procs if p.exitcode is not None]
            if dead or time.monotonic() > deadline:
                msg = (
                    f"a load generator did not get ready (exit codes {[p.exitcode for p in procs]})"
                )
                raise RuntimeError(msg)
            time.sleep(0.1)
        pid = worker.proc.pid if worker.proc else os.getpid()
        applied0, cpu0, t0 = applied(worker), _cpu_seconds(pid), time.perf_counter()
        go.set()
        rss: list[int] = []
        while time.perf_counter() - t0 < cfg.duration_s:
            time.sleep(0.5)
            rss.append(_rss_bytes(pid))
        elapsed = time.perf_counter() - t0
        applied1, cpu1 = applied(worker), _cpu_seconds(pid)
        results: dict[str, Any] = {}
        for _ in procs:
            results.update(out.get(timeout=cfg.duration_s + 120))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return {
        **results,
        "generators_kept_up": bool(results["events_kept_up"] and results["requests_kept_up"]),
        "worker_events_per_s": (applied1 - applied0) / elapsed,
        "worker_cpu_percent": 100.0 * (cpu1 - cpu0) / elapsed,
        "worker_rss_bytes": max(rss, default=_rss_bytes(pid)),
    }


def _summary(cfg: MixedBench, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> dict[str, float]:
        return spread([x[key] for x in runs])

    figures = ("latency_p50_ms", "latency_p99_ms", "latency_p999_ms", "freshness_p50_ms",
               "freshness_p99_ms", "worker_events_per_s", "requests_per_s", "worker_cpu_percent",
               "worker_rss_bytes", "events_offered_per_s", "requests_offered_per_s",
               "clicks_per_s", "shed_per_s", "shed_latency_p99_ms")  # fmt: skip
    out: dict[str, Any] = {k: med(k)["median"] for k in figures}
    out.update({f"{k}_spread": med(k) for k in figures})
    out.update(
        offered_events_per_s=cfg.event_rate,
        offered_requests_per_s=cfg.request_rate,
        generators_kept_up=all(x["generators_kept_up"] for x in runs),
        requests=sum(x["requests"] for x in runs),
        lost=sum(x["lost"] for x in runs),
        shed=sum(x["shed"] for x in runs),
        clicks=sum(x["clicks"] for x in runs),
        freshness_samples=sum(x["freshness_samples"] for x in runs),
        candidates=cfg.candidates, ctr=cfg.ctr, repeats=cfg.repeats,
        duration_s=cfg.duration_s, users=cfg.users, ads=cfg.ads,
        targets={"latency_p99_ms": 15.0, "freshness_p99_ms": 100.0},
        machine=machine(),
    )  # fmt: skip
    return out


def _repeat_line(r: int, cfg: MixedBench, x: dict[str, Any]) -> str:
    return (
        f"  repeat {r + 1}/{cfg.repeats}: offered {x['events_offered_per_s']:,.0f} events/s + "
        f"{x['requests_offered_per_s']:,.0f} req/s; worker {x['worker_events_per_s']:,.0f} "
        f"events/s, {x['requests_per_s']:,.0f} decisions/s, {x['shed_per_s']:,.0f} shed/s; "
        f"decision p50 "
        f"{x['latency_p50_ms']:.1f} p99 {x['latency_p99_ms']:.1f} p99.9 "
        f"{x['latency_p999_ms']:.1f} ms; freshness p99 {x['freshness_p99_ms']:.1f} ms; CPU "
        f"{x['worker_cpu_percent']:.0f}%, RSS {x['worker_rss_bytes'] / 2**20:.0f} MiB"
    )


def result_line(res: dict[str, Any]) -> str:
    kept = "" if res["generators_kept_up"] else " (GENERATORS FELL BEHIND: offered < asked)"
    return (
        f"mixed: asked {res['offered_events_per_s']:,.0f} events/s + "
        f"{res['offered_requests_per_s']:,.0f} req/s x {res['candidates']}, offered "
        f"{res['events_offered_per_s']:,.0f} + {res['requests_offered_per_s']:,.0f}{kept}; worker "
        f"{res['worker_events_per_s']:,.0f} events/s, {res['requests_per_s']:,.0f} decisions/s "
        f"and {res['shed_per_s']:,.0f} shed/s (giving way to ingest; their p99 "
        f"{res['shed_latency_p99_ms']:.1f} ms); "
        f"decision p50 {res['latency_p50_ms']:.1f} p99 {res['latency_p99_ms']:.1f} (range "
        f"{res['latency_p99_ms_spread']['min']:.1f}-{res['latency_p99_ms_spread']['max']:.1f}) "
        f"p99.9 {res['latency_p999_ms']:.1f} ms (target p99 <= 15); freshness p99 "
        f"{res['freshness_p99_ms']:.1f} ms (target <= 100); worker CPU "
        f"{res['worker_cpu_percent']:.0f}%, RSS {res['worker_rss_bytes'] / 2**20:.0f} MiB; "
        f"{res['lost']} lost; {machine_line(res['machine'])}"
    )


# -- worker resources, from /proc ----------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process (psutil when installed, else /proc)."""
    try:
        import psutil  # noqa: PLC0415 - optional

        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except ImportError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the generators, each in its own process -----------------------------------------------
def _events_main(s: Settings, cfg: MixedBench, r: int, ready: MpEvent, go: MpEvent,
                 out: Any) -> None:  # fmt: skip
    gc.disable()  # this process's collector pauses would count as the worker's latency
    out.put(asyncio.run(_events(s, cfg, r, ready, go)))


def _requests_main(s: Settings, cfg: MixedBench, ad_items: dict[str, tuple[int, int]], r: int,
                   ready: MpEvent, go: MpEvent, out: Any) -> None:  # fmt: skip
    gc.disable()
    out.put(asyncio.run(_requests(s, cfg, ad_items, r, ready, go)))


async def _events(
    s: Settings, cfg: MixedBench, r: int, ready: MpEvent, go: MpEvent
) -> dict[str, Any]:
    n = int(cfg.event_rate * cfg.duration_s)
    workload = Workload(WorkloadModel(), users=cfg.users, seed=10 + r)
    keys, values = workload.payloads(n, int(time.time() * 1000), prefix=f"m{r}-",
                                     per_second=max(1, int(cfg.event_rate)))  # fmt: skip
    user_prefix = f"m{r}-"  # users new to this repeat: their counters start at zero
    keys = [user_prefix.encode() + k for k in keys]
    values = [v.replace(b'"user_id":"', b'"user_id":"' + user_prefix.encode(), 1) for v in values]
    to_state = Pseudonymiser.from_settings(s)  # the worker's table keys
    state_key = {k: to_state(k.decode()).encode() for k in set(keys)}
    watch = ChangelogFreshness(s)
    producer = AIOKafkaProducer(**client_kwargs(s), linger_ms=1, acks=1)
    await watch.start()
    await producer.start()
    try:
        watcher = asyncio.create_task(watch.watch(n))
        ready.set()
        await asyncio.to_thread(go.wait)
        topic, tick, start = s.topic("user-events"), 0.005, time.perf_counter()
        i, behind = 0, 0.0
        while i < n:
            due = min(n, int((time.perf_counter() - start) * cfg.event_rate) + 1)
            behind = max(behind, (due - i) / cfg.event_rate)
            while i < due:
                watch.mark(state_key[keys[i]])
                await producer.send(topic, values[i], key=keys[i])
                i += 1
            await asyncio.sleep(tick)
        offered_s = time.perf_counter() - start
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher, timeout=30)
        fresh = watch.fresh
        p50, p99 = percentiles_ms(fresh, [50, 99])
        return {
            "events_offered_per_s": n / offered_s, "freshness_p50_ms": p50,
            "freshness_p99_ms": p99, "freshness_samples": len(fresh),
            "events_kept_up": offered_s <= cfg.duration_s * 1.05,
            "events_generator_behind_s": behind,
        }  # fmt: skip
    finally:
        await watch.stop()
        await producer.stop()


async def _requests(s: Settings, cfg: MixedBench, ad_items: dict[str, tuple[int, int]], r: int,
                    ready: MpEvent, go: MpEvent) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(200 + r)
    reqs = PoissonRequests.build(rng, cfg.request_rate, cfg.duration_s, cfg.users,
                                 list(ad_items), cfg.candidates, prefix=f"x{r}-")  # fmt: skip
    n = len(reqs)
    sent: dict[str, tuple[float, int]] = {}
    latencies: list[float] = []  # of the decisions the worker made (its shed no fills apart)
    shed: list[float] = []
    clicks = 0
    async with decision_clients(s) as (consumer, producer):

        async def watch() -> None:
            nonlocal clicks
            click_rng = np.random.default_rng(300 + r)
            while len(latencies) + len(shed) < n:
                batch = await consumer.getmany(timeout_ms=100)
                now = time.perf_counter()
                for records in batch.values():
                    for rec in records:
                        d = json.loads(rec.value)
                        hit = sent.pop(d.get("request_id", ""), None)
                        if hit is None:
                            continue
                        if d.get("no_fill_reason") == "shed":  # gave way to ingest: unscored
                            shed.append(now - hit[0])
                            continue
                        latencies.append(now - hit[0])
                        ad = d.get("ad_id")
                        if ad and click_rng.random() < cfg.ctr:
                            clicks += 1
                            await _click(producer, s, d, ad, reqs.keys[hit[1]], ad_items[ad])

        watcher = asyncio.create_task(watch())
        ready.set()
        await asyncio.to_thread(go.wait)
        offered_s = await reqs.offer(producer, s.topic("ad-requests"), time.perf_counter(), sent)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher, timeout=30)
        p50, p99, p999 = percentiles_ms(latencies, [50, 99, 99.9])
        kept_up = offered_s <= max(cfg.duration_s, float(reqs.arrivals[-1])) * 1.05
        return {
            "requests_offered_per_s": n / offered_s, "requests": n,
            "lost": n - len(latencies) - len(shed),
            "latency_p50_ms": p50, "latency_p99_ms": p99, "latency_p999_ms": p999,
            "requests_per_s": len(latencies) / offered_s, "clicks_per_s": clicks / offered_s,
            "clicks": clicks,
            "shed_per_s": len(shed) / offered_s, "shed": len(shed),
            "shed_latency_p99_ms": percentiles_ms(shed, [99])[0] if shed else 0.0,
            "requests_kept_up": kept_up,
        }  # fmt: skip


async def _click(producer: AIOKafkaProducer, s: Settings, decision: dict[str, Any], ad: str,
                 user_key: bytes, item: tuple[int, int]) -> None:  # fmt: skip
    event = {
        "event_id": f"click-{decision['request_id']}", "user_id": user_key.decode(),
        "kind": "click", "item_id": item[0], "category_id": item[1],
        "ts": int(time.time() * 1000), "ad_id": ad, "decision_id": decision["request_id"],
    }  # fmt: skip
    await producer.send(s.topic("user-events"), json.dumps(event).encode(), key=user_key)
