"""``adpulse bench serve``: ``POST /decide`` latency of one worker under open-loop load.

Setup as ``bench decisions``: a synthetic catalog, ``users`` users with warm
interest vectors, one ``adpulse worker``. With ``workers`` above 1, more workers then
join its group, and the requests go to them round robin, as from a load balancer that
does not know which worker owns which user: a request that reaches a non-owner is
forwarded (counted, and the hop timed from the forwarders' histogram); their metrics
and CPU are summed. Then, each phase at ``rate`` requests/s with Poisson arrivals over
a keep-alive connection pool (one per worker):

1. **floor**: ``GET /health`` of the same server: what HTTP alone costs here;
2. **alone**: ``POST /decide``, each request naming ``candidates`` ads;
3. **with ingest**: the same, while another process produces ``event_rate``
   user-events/s; meanwhile a freshness probe produces one event for a new user
   every 100 ms and polls the interest lookup (the table ``/decide`` reads) every
   2 ms until it shows the event: produced to visible.

With ``swap``, a copy of the serving model is published as a newer version halfway
through phase 2 (the worker polls its registry every second): the requests sent from
then until 3 s later are reported apart from the rest (``swap``), with the worker's
swap counter, so a hot swap that drops or delays decisions shows (issue 17's promotion
is this swap).

Latency is measured from each request's *scheduled* send time, not from when
the generator got round to it, so a stall shows in full (no coordinated
omission). Finally the in-process cost of one decision without HTTP (the
decision stage on the same catalog and model, one request at a time) is timed
in this process. Only ratios within one run compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from math import inf, nan
from pathlib import Path
from typing import Any, Literal

import aiohttp
import numpy as np
from aiokafka import AIOKafkaProducer

from adpulse.bench import cpu, httpload, machine, machine_line, percentiles_ms
from adpulse.bench.decisionpath import DecisionPath, request_bodies
from adpulse.bench.decisions import per_minute_p99
from adpulse.bench.warm import Warm, warm_worker
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from adpulse.workload import Workload, WorkloadModel
from scoring.registry import MODEL, PACKAGED
from streams.serve import user_partition

POOL = 128  # keep-alive connections the generator may hold open
TIMEOUT_S = 10.0  # a request unanswered this long is an error
PROBE_EVERY_S = 0.1
# A probe polls 2 ms apart at first, then a tenth of its elapsed time apart: a reading is
# at most 10% (or 2 ms) late, never early. Polled every 2 ms throughout, a probe waiting
# out a 2 s backlog sent the worker up to 500 GETs/s (one per 2 ms), more the slower it got.
PROBE_POLL_S = 0.002
PROBE_POLL_FRACTION = 0.1
PROBE_GIVE_UP_S = 10.0  # a probe not seen by then counts as 10 s (it used to be dropped at 5)


@dataclass(frozen=True)
class ServeBench:
    rate: float = 1000.0
    duration_s: float = 20.0
    event_rate: float = 5000.0
    users: int = 10_000
    candidates: int = 100
    ads: int = 2_000
    warm_events: int = 100_000
    swap: bool = False  # publish a new model version halfway through phase 2
    workers: int = 1  # this many workers of one group share the requests
    route: Literal["any", "owner"] = "any"  # any: round robin (non-owners forward); owner: to
    # each user's owner (GET /owners)

    @classmethod
    def smoke(cls) -> ServeBench:
        return cls(rate=100.0, duration_s=2.0, event_rate=200.0, users=100, ads=200,
                   warm_events=1_000)  # fmt: skip


@dataclass
class Phase:
    """One open-loop run: per request, its scheduled offset and outcome."""

    scheduled: list[float]
    latency_s: list[float]  # answered (200) requests only
    sent_at: list[float]  # their scheduled offsets
    shed: int = 0
    shed_ingest: int = 0  # of them, shed because ingest was behind (the worker's count)
    errors: int = 0
    no_fill: int = 0
    duration_s: float = 0.0  # the offer window: first to last scheduled send
    answered_in_window: int = 0  # answered before the window closed
    in_worker: tuple[float, float] = (float("nan"), float("nan"))  # p50, p99 ms (bucket bound)
    loop_lag: tuple[float, float] = (float("nan"), float("nan"))  # the worker's, likewise
    cpu: dict[str, float] = field(default_factory=dict)  # adpulse/bench/cpu.py usage()
    started: float = 0.0  # time.perf_counter() when the schedule began
    workers: int = 1
    forwarded: int = 0  # requests a non-owner passed on to the owner (the workers' count)
    hop: tuple[float, float] = (nan, nan)  # the forward's p50, p99 ms (bucket bound)
    hops_counted: int = 0  # observations the hop histogram gained (a count, not a time)

    def summary(self) -> dict[str, Any]:
        p50, p99, p999 = percentiles_ms(self.latency_s, [50, 99, 99.9])
        return {
            "requests": len(self.scheduled), "answered": len(self.latency_s),
            "achieved_per_s": self.answered_in_window / max(self.duration_s, 1e-9),
            "latency_p50_ms": p50, "latency_p99_ms": p99, "latency_p999_ms": p999,
            "shed": self.shed, "shed_ingest": self.shed_ingest, "errors": self.errors,
            "no_fill": self.no_fill,
            "in_worker_p50_ms": self.in_worker[0], "in_worker_p99_ms": self.in_worker[1],
            "loop_lag_p50_ms": self.loop_lag[0], "loop_lag_p99_ms": self.loop_lag[1],
            "forwarded": self.forwarded, "forward_p50_ms": self.hop[0],
            "forward_p99_ms": self.hop[1], "forwards_counted": self.hops_counted, **self.cpu,
        }  # fmt: skip


SWAP_WINDOW_S = 3.0  # requests sent this long after the new version is published


def run(base: Settings, cfg: ServeBench, log: Any = print) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        registry = None
        if cfg.swap:
            registry = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reg-")))
            _copy_version(_packaged_version(), registry / "v0001")
            base = base.with_(model_dir=str(registry), model_poll_s=1.0)
        return _run(base, cfg, registry, log)


def _packaged_version() -> Path:
    return sorted(p for p in PACKAGED.iterdir() if (p / MODEL).is_file())[-1]


def _copy_version(src: Path, dest: Path) -> None:
    """Publish ``src`` as version ``dest``: copied under a temporary name, then renamed into
    place, as scoring/registry.py asks, so the worker's poll never sees half a version."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copytree(src, tmp)
    tmp.rename(dest)


SHED_INGEST = 'outcome="shed_ingest"'  # POST /decide gave way to ingest (streams/serve.py)
FORWARDED = 'outcome="forwarded"'  # a non-owner passed the request on
HOP = "adpulse_decide_forward_seconds"  # that forward's round trip, as the forwarder saw it


def _forwards(workers: Fleet) -> tuple[float, dict[float, float]]:
    return workers.metric("adpulse_decide_requests_total", FORWARDED), workers.buckets(HOP)


def _forwarded_since(
    phase: Phase, workers: Fleet, before: tuple[float, dict[float, float]]
) -> None:
    """Into ``phase``: requests forwarded since ``before`` (:func:`_forwards`), the hops the
    histogram counted meanwhile, and their p50, p99 ms."""
    count, hop = _forwards(workers)
    phase.forwarded = round(count - before[0])
    phase.hops_counted = round(hop.get(inf, 0.0) - before[1].get(inf, 0.0))
    phase.hop = _quantiles(before[1], hop)


@dataclass(frozen=True)
class Fleet:
    """The workers of one run, which share its requests (:func:`_routes`: round robin, so
    a request for a user another worker owns is forwarded, one more HTTP hop; or each to
    its user's owner). Their metrics and CPU are summed."""

    members: list[WorkerProcess]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.members]

    def metric(self, name: str, labels: str = "") -> float:
        return sum(w.metric(name, labels) for w in self.members)

    def buckets(self, name: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for w in self.members:
            for bound, count in w.buckets(name).items():
                out[bound] = out.get(bound, 0.0) + count
        return out


@contextlib.contextmanager
def _fleet(warm: Warm, cfg: ServeBench, log: Any) -> Iterator[Fleet]:
    """The warm worker and ``cfg.workers - 1`` more in its group, once each owns some
    users' partitions and has restored their state; the ones started here stop on exit."""
    first = warm.worker
    root, s = first.log_path.parent, first.settings
    more: list[WorkerProcess] = []
    try:
        for i in range(1, cfg.workers):
            log(f"  worker {i + 1} of {cfg.workers} joins the group")
            ws = s.with_(data_dir=Path(s.data_dir).parent / f"{s.app_id}-w{i}")
            more.append(WorkerProcess(ws, root, name=f"worker{i}").start(120))
        fleet = Fleet([first, *more])
        if more:
            ad_ids = [a["ad_id"] for a in warm.ads]
            _wait_split(fleet, _bodies(cfg, ad_ids, 32, 99, "split"))
        yield fleet
    finally:
        for w in more:
            w.stop()


def _wait_split(fleet: Fleet, bodies: list[bytes]) -> None:
    """Until the first worker answers all of ``bodies`` (through the others for their users)
    and every worker answered some itself: the group has rebalanced and every new owner
    has restored its partitions (until then they answer 503)."""
    first, answered = fleet.members[0], 'outcome="answered"'

    def split() -> bool:
        before = [w.metric("adpulse_decide_requests_total", answered) for w in fleet.members]
        ok = all(first.post("/decide", b)[0] == 200 for b in bodies)
        after = [w.metric("adpulse_decide_requests_total", answered) for w in fleet.members]
        return ok and all(a > b for a, b in zip(after, before, strict=True))

    first.wait_until(split, 300, "every worker to own partitions and answer /decide", every=1.0)


def _count_since(workers: Fleet, labels: str, before: float) -> int:
    return round(workers.metric("adpulse_decide_requests_total", labels) - before)


def _swap_later(registry: Path, after_s: float) -> tuple[threading.Timer, list[float]]:
    """Publish v0002 ``after_s`` from now; the list gets the perf_counter time it was done."""
    at: list[float] = []

    def publish() -> None:
        _copy_version(registry / "v0001", registry / "v0002")
        at.append(time.perf_counter())

    timer = threading.Timer(after_s, publish)
    timer.start()
    return timer, at


def _run(base: Settings, cfg: ServeBench, registry: Path | None, log: Any) -> dict[str, Any]:
    with (
        warm_worker(base, cfg.users, cfg.ads, cfg.warm_events) as warm,
        _fleet(warm, cfg, log) as workers,
    ):
        s, ads = warm.settings, warm.ads
        ad_ids = [a["ad_id"] for a in ads]
        log(f"  floor: GET /health at {cfg.rate:g}/s for {cfg.duration_s:g} s")
        floor = _measured(lambda: _offer(workers, cfg, ad_ids, "floor"))
        log(f"  alone: POST /decide at {cfg.rate:g}/s x {cfg.candidates} candidates")
        before = workers.buckets("adpulse_decide_seconds")
        lag = workers.buckets("adpulse_event_loop_lag_seconds")
        forwards = _forwards(workers)
        t0 = cpu.sample(*workers.pids)
        swaps = workers.metric("adpulse_model_swaps_total", 'outcome="swapped"')
        gave_way = workers.metric("adpulse_decide_requests_total", SHED_INGEST)
        timer, published = (None, []) if registry is None else _swap_later(
            registry, cfg.duration_s / 2)  # fmt: skip
        alone = _measured(lambda: _offer(workers, cfg, ad_ids, "alone"))
        alone.cpu = cpu.usage(t0, cpu.sample(*workers.pids), len(alone.latency_s))
        swap = None
        if timer is not None:
            timer.join()
            swapped = workers.metric("adpulse_model_swaps_total", 'outcome="swapped"') - swaps
            swap = _around_swap(alone, published[0] - alone.started, swapped)
            log(f"  swap: {_swap_line(swap)}")
        alone.in_worker = _quantiles(before, workers.buckets("adpulse_decide_seconds"))
        alone.loop_lag = _quantiles(lag, workers.buckets("adpulse_event_loop_lag_seconds"))
        alone.shed_ingest = _count_since(workers, SHED_INGEST, gave_way)
        _forwarded_since(alone, workers, forwards)
        log(f"  alone: {_phase_line(alone)}")
        log(f"  with ingest: the same + {cfg.event_rate:g} user-events/s, freshness probes")
        ingest = _ingest_process(s, cfg)
        before = workers.buckets("adpulse_decide_seconds")
        batches = workers.buckets("adpulse_ingest_batch_seconds")
        lag = workers.buckets("adpulse_event_loop_lag_seconds")
        gave_way = workers.metric("adpulse_decide_requests_total", SHED_INGEST)
        forwards = _forwards(workers)
        try:
            t0 = cpu.sample(*workers.pids)
            busy, fresh = _measured(lambda: _offer_with_probe(s, workers, cfg, ad_ids))
            busy.cpu = cpu.usage(t0, cpu.sample(*workers.pids), len(busy.latency_s))
            busy.in_worker = _quantiles(before, workers.buckets("adpulse_decide_seconds"))
            busy.loop_lag = _quantiles(lag, workers.buckets("adpulse_event_loop_lag_seconds"))
            busy.shed_ingest = _count_since(workers, SHED_INGEST, gave_way)
            _forwarded_since(busy, workers, forwards)
            ingest_batch = _quantiles(batches, workers.buckets("adpulse_ingest_batch_seconds"))
            log(
                f"  with ingest: {_phase_line(busy)}; ingest batches p50 <= "
                f"{ingest_batch[0]:g} ms, p99 <= {ingest_batch[1]:g} ms"
            )
        finally:
            ingest.join(cfg.duration_s + 60)
            if ingest.is_alive():
                ingest.kill()
        forwarded = workers.metric("adpulse_decide_requests_total", FORWARDED)
    in_process = _in_process(cfg, ads, warm.warm_values)
    a, b = alone.summary(), busy.summary()
    (floor_p99,) = percentiles_ms(floor.latency_s, [99])
    fresh_p50, fresh_p99 = percentiles_ms(fresh, [50, 99])
    out: dict[str, Any] = {
        "offered_per_s": cfg.rate, "achieved_per_s": a["achieved_per_s"],
        "candidates": cfg.candidates,
        "latency_p50_ms": a["latency_p50_ms"], "latency_p99_ms": a["latency_p99_ms"],
        "latency_p999_ms": a["latency_p999_ms"],
        "with_ingest_latency_p50_ms": b["latency_p50_ms"],
        "with_ingest_latency_p99_ms": b["latency_p99_ms"],
        "with_ingest_latency_p999_ms": b["latency_p999_ms"],
        "with_ingest_achieved_per_s": b["achieved_per_s"],
        "event_rate": cfg.event_rate,
        "freshness_p50_ms": fresh_p50, "freshness_p99_ms": fresh_p99,
        "freshness_probes": len(fresh),
        "ingest_batch_p50_ms": ingest_batch[0], "ingest_batch_p99_ms": ingest_batch[1],
        "floor_p99_ms": floor_p99,
        "in_process_p50_ms": in_process[0], "in_process_p99_ms": in_process[1],
        "errors": a["errors"] + b["errors"], "shed": a["shed"] + b["shed"],
        "no_fill": a["no_fill"] + b["no_fill"], "forwarded": forwarded,
        "workers": cfg.workers, "route": cfg.route,
        "alone": a, "with_ingest": b, "floor": floor.summary(),
        "duration_s": cfg.duration_s, "users": cfg.users, "ads": cfg.ads,
        "machine": machine(),
    }  # fmt: skip
    if swap is not None:
        out["swap"] = swap
    if cfg.duration_s >= 120:
        out["p99_per_minute_ms"] = per_minute_p99(alone.sent_at, alone.latency_s, cfg.duration_s)
    return out


def result_line(res: dict[str, Any]) -> str:
    minutes = ""
    per_min = res.get("p99_per_minute_ms") or []
    if len(per_min) >= 2:
        shown = " ".join(f"{m:.1f}" for m in per_min)
        minutes = f"p99 per minute {shown} ms (last/second {per_min[-1] / per_min[1]:.2f}x); "
    return (
        f"serve: offered {res['offered_per_s']:,.0f}/s x {res['candidates']} candidates, "
        f"achieved {res['achieved_per_s']:,.0f}/s; /decide p50 {res['latency_p50_ms']:.2f} ms "
        f"p99 {res['latency_p99_ms']:.2f} ms p99.9 {res['latency_p999_ms']:.2f} ms; "
        f"with {res['event_rate']:,.0f} events/s ingest p99 "
        f"{res['with_ingest_latency_p99_ms']:.2f} ms; freshness p99 "
        f"{res['freshness_p99_ms']:.1f} ms; HTTP floor (/health) p99 {res['floor_p99_ms']:.2f} "
        f"ms; in-process decision p99 {res['in_process_p99_ms']:.2f} ms; {res['errors']} "
        f"errors, {res['shed']} shed, {res['no_fill']} no-fill; {minutes}{_workers_part(res)}"
        f"{machine_line(res['machine'])}"
    )


def _workers_part(res: dict[str, Any]) -> str:
    n = res.get("workers", 1)
    if n == 1:
        return ""
    return f"{n} workers, routed to {res['route']}, {res['forwarded']:,.0f} requests forwarded; "


def _phase_line(ph: Phase) -> str:
    x = ph.summary()
    return (
        f"{x['achieved_per_s']:,.0f} answered/s, p50 {x['latency_p50_ms']:.2f} ms p99 "
        f"{x['latency_p99_ms']:.2f} ms p99.9 {x['latency_p999_ms']:.2f} ms (in the worker: "
        f"p50 <= {x['in_worker_p50_ms']:g} ms, p99 <= {x['in_worker_p99_ms']:g} ms; event loop "
        f"late p50 <= {x['loop_lag_p50_ms']:g} ms, p99 <= {x['loop_lag_p99_ms']:g} ms); "
        f"{x['shed']} shed ({x['shed_ingest']} giving way to ingest), {x['errors']} errors; "
        f"{_forward_part(ph)}CPU: {_who(ph)} {x.get('worker_cpu_pct', nan):.0f}% "
        f"of a core ({x.get('worker_cpu_ms_per_answer', nan):.2f} ms per answer), generator "
        f"{x.get('generator_cpu_pct', nan):.0f}%, box {x.get('box_busy_pct', nan):.0f}% busy "
        f"(stolen by the hypervisor: {x.get('box_steal_pct', nan):.0f}%)"
    )


def _who(ph: Phase) -> str:
    return "worker" if ph.workers == 1 else f"{ph.workers} workers together"


def _forward_part(ph: Phase) -> str:
    if ph.workers == 1:
        return ""
    return (f"{ph.forwarded} forwarded to their owner (the hop: p50 <= {ph.hop[0]:g} ms, "
            f"p99 <= {ph.hop[1]:g} ms); ")  # fmt: skip


def _around_swap(ph: Phase, at_s: float, swapped: float) -> dict[str, Any]:
    """The requests scheduled in the SWAP_WINDOW_S after the new version was published,
    against the rest of the phase (latency from the schedule, as everywhere here)."""
    sent = np.asarray(ph.sent_at)
    lat = np.asarray(ph.latency_s)
    near = (sent >= at_s) & (sent < at_s + SWAP_WINDOW_S)
    scheduled = np.asarray(ph.scheduled)
    offered = int(((scheduled >= at_s) & (scheduled < at_s + SWAP_WINDOW_S)).sum())
    (p99_near,) = percentiles_ms(lat[near].tolist(), [99]) if near.any() else (float("nan"),)
    (p99_rest,) = percentiles_ms(lat[~near].tolist(), [99]) if (~near).any() else (float("nan"),)
    return {"published_at_s": at_s, "swapped": swapped, "window_s": SWAP_WINDOW_S,
            "offered": offered, "answered": int(near.sum()), "p99_ms": p99_near,
            "p99_rest_ms": p99_rest}  # fmt: skip


def _swap_line(x: dict[str, Any]) -> str:
    return (
        f"new version published {x['published_at_s']:.1f} s in, worker swapped "
        f"{x['swapped']:g} time(s); in the next {x['window_s']:g} s {x['answered']} of "
        f"{x['offered']} requests answered, p99 {x['p99_ms']:.2f} ms (rest of the phase "
        f"{x['p99_rest_ms']:.2f} ms)"
    )


def _quantiles(before: dict[float, float], after: dict[float, float]) -> tuple[float, float]:
    """p50, p99 (ms, as the upper bound of their histogram bucket) of what a phase added."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan"), float("nan")
    out = []
    for q in (0.5, 0.99):
        i = next(i for i, c in enumerate(counts) if c >= q * counts[-1])
        out.append(bounds[i] * 1000)
    return out[0], out[1]


def _measured(fn: Any) -> Any:
    gc.collect()
    gc.freeze()  # this process's collector pauses are not the worker's latency
    try:
        return asyncio.run(fn())
    finally:
        gc.unfreeze()


def _bodies(cfg: ServeBench, ad_ids: list[str], n: int, seed: int, tag: str) -> list[bytes]:
    return request_bodies(ad_ids, cfg.users, cfg.candidates, n, seed, tag)


async def _offer(workers: Fleet, cfg: ServeBench, ad_ids: list[str], phase: str) -> Phase:
    n = int(cfg.rate * cfg.duration_s)
    rng = np.random.default_rng({"floor": 1, "alone": 2, "ingest": 3}[phase])
    arrivals = np.cumsum(rng.exponential(1.0 / cfg.rate, n)).tolist()
    pools = [_pool(w, phase != "floor") for w in workers.members]
    # Built before the clock starts: the generator must not compete with the worker.
    if phase == "floor":
        to = [i % len(pools) for i in range(n)]
        requests = [pools[j].build("GET", "/health") for j in to]
    else:
        bodies = _bodies(cfg, ad_ids, n, 10 + len(phase), phase)
        to = _routes(workers, bodies, cfg.route)
        requests = [pools[j].build("POST", "/decide", b) for j, b in zip(to, bodies, strict=True)]
    out = Phase(arrivals, [], [], workers=len(pools))
    floor = phase == "floor"

    async def one(i: int, due: float) -> None:
        try:
            status, raw = await pools[to[i]].request(requests[i], TIMEOUT_S)
        except (httpload.ClientError, TimeoutError):
            status, raw = 0, b""
        if status == 503 and not floor:
            out.shed += 1
            return
        if status != 200:
            out.errors += 1
            return
        if not floor and b'"ad_id":null' in raw:
            out.no_fill += 1
        done = time.perf_counter()
        out.latency_s.append(done - due)
        out.sent_at.append(due - start)
        out.answered_in_window += done <= start + arrivals[-1]

    try:
        for pool in pools:  # open each pool's first connections before the clock starts
            for _ in range(3):
                await pool.request(pool.build("GET", "/health"), TIMEOUT_S)
        # Only requests in flight are held: a list of every task of a 5-minute run keeps
        # 300,000 finished tasks alive for this process's garbage collector to walk, and
        # a generator pause counts as latency here (it is measured from the schedule).
        tasks: set[asyncio.Task[None]] = set()
        start = out.started = time.perf_counter()
        for i, at in enumerate(arrivals):
            due = start + at
            delay = due - time.perf_counter()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        out.duration_s = arrivals[-1]
        await asyncio.gather(*tasks)
    finally:
        for pool in pools:
            pool.close()
    return out


def _owners(workers: Fleet) -> Callable[[str], int | None]:
    """Which of ``workers`` owns a user's partition, by the group's ``GET /owners`` and
    Kafka's murmur2 of the raw id (docs/decide.md); None where the map names no owner."""
    if len(workers.members) == 1:
        return lambda _user: 0
    status, got = workers.members[0].get("/owners")
    if status != 200 or not isinstance(got, dict):
        msg = f"GET /owners answered {status}: {got!r}"
        raise RuntimeError(msg)
    index = {w.url: j for j, w in enumerate(workers.members)}
    owners = {int(p): index.get(url) for p, url in got["owners"].items()}
    parts = got["partitions"]
    return lambda user: owners.get(user_partition(user, parts))


def _routes(workers: Fleet, bodies: list[bytes], route: str) -> list[int]:
    """Which worker each request goes to: round robin, or (``owner``) the one that owns its
    user's partition (round robin where the map names none)."""
    k = len(workers.members)
    if route != "owner":
        return [i % k for i in range(len(bodies))]
    owner = _owners(workers)
    picked = (owner(json.loads(b)["user_id"]) for b in bodies)
    return [i % k if j is None else j for i, j in enumerate(picked)]


def _pool(worker: WorkerProcess, decide: bool) -> httpload.Pool:
    """Keep-alive connections to the worker's /decide port (its web port for /health)."""
    port = worker.settings.decide_port if decide else 0
    return httpload.Pool("127.0.0.1", port or worker.settings.web_port, POOL, worker.auth)


async def _offer_with_probe(
    s: Settings, workers: Fleet, cfg: ServeBench, ad_ids: list[str]
) -> tuple[Phase, list[float]]:
    owner = _owners(workers)  # before the clock starts: a blocking GET
    probe = asyncio.create_task(_freshness(s, workers, owner, cfg.duration_s))
    phase = await _offer(workers, cfg, ad_ids, "ingest")
    return phase, await probe


async def _freshness(
    s: Settings, workers: Fleet, owner: Callable[[str], int | None], duration_s: float
) -> list[float]:
    """Produced -> visible in the interest table, for one new user every 100 ms, asked of
    the user's owner (a lookup elsewhere would also time a forward)."""
    producer = AIOKafkaProducer(**client_kwargs(s), linger_ms=0, acks=1)
    await producer.start()
    seen: list[float] = []
    try:
        timeout = aiohttp.ClientTimeout(total=5)
        auth = workers.members[0].auth
        async with aiohttp.ClientSession(timeout=timeout, headers=auth) as session:
            end = time.perf_counter() + duration_s
            k = 0
            while time.perf_counter() < end:
                user = f"fresh-{uuid.uuid4().hex[:10]}"
                url = workers.members[owner(user) or 0].url
                event = {"event_id": f"{user}-e", "user_id": user, "kind": "click",
                         "item_id": 7, "category_id": 7, "ts": int(time.time() * 1000)}  # fmt: skip
                t0 = time.perf_counter()
                await producer.send(s.topic("user-events"), json.dumps(event).encode(),
                                    key=user.encode())  # fmt: skip
                while True:
                    async with session.get(f"{url}/users/{user}/interest") as resp:
                        await resp.read()
                        elapsed = time.perf_counter() - t0
                        if resp.status == 200 or elapsed >= PROBE_GIVE_UP_S:
                            # one never seen counts as its wait, so the p99 cannot hide it
                            seen.append(elapsed)
                            break
                    await asyncio.sleep(max(PROBE_POLL_S, PROBE_POLL_FRACTION * elapsed))
                k += 1
                await asyncio.sleep(max(0.0, t0 + PROBE_EVERY_S - time.perf_counter()))
    finally:
        await producer.stop()
    return seen


def _ingest_process(s: Settings, cfg: ServeBench) -> Any:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=_ingest_main,
        args=(s.bootstrap, s.topic("user-events"), cfg.event_rate, cfg.duration_s + 2, cfg.users),
        daemon=True,
    )
    proc.start()
    return proc


def _ingest_main(bootstrap: str, topic: str, rate: float, duration_s: float, users: int) -> None:
    asyncio.run(_ingest(bootstrap, topic, rate, duration_s, users))


async def _ingest(bootstrap: str, topic: str, rate: float, duration_s: float, users: int) -> None:
    """``rate`` events/s in 10 ms ticks: ingest load that competes with ``/decide``."""
    workload = Workload(WorkloadModel(), users=users, seed=9)
    per_tick = max(1, int(rate / 100))
    ticks = int(duration_s * 100)
    keys, values = workload.payloads(per_tick * ticks, int(time.time() * 1000), prefix="live")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    await producer.start()
    try:
        start = time.perf_counter()
        for t in range(ticks):
            await asyncio.sleep(max(0.0, start + t / 100 - time.perf_counter()))
            for j in range(t * per_tick, (t + 1) * per_tick):
                await producer.send(topic, values[j], key=keys[j])
        await producer.flush()
    finally:
        await producer.stop()


def _in_process(
    cfg: ServeBench, ads: list[dict[str, Any]], values: list[bytes]
) -> tuple[float, float]:
    """p50, p99 (ms) of one decision in the decision stage itself: no HTTP, no Kafka."""
    path = DecisionPath.build(ads, values)
    bodies = request_bodies([a["ad_id"] for a in ads], cfg.users, cfg.candidates, 2_000, 77, "in")
    times = []
    for b in bodies:
        t0 = time.perf_counter()
        path.decide([b])
        times.append(time.perf_counter() - t0)
    p50, p99 = percentiles_ms(times[100:], [50, 99])  # the first ones warm the caches
    return p50, p99
