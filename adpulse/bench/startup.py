"""``adpulse bench startup``: does a worker that says ready go on to load its catalog?

Why: a worker was once seen to log "Worker ready" (/health 200) and then fetch
nothing, on a long-lived test-session broker (then tansu) holding the topics and
data of many earlier tests; ``tests/integration/test_decisions.py`` timed out
"waiting for 42 ads". It was never reproduced. This bench tries to, on each
embedded broker in one run, and measures instead of guessing.

Per broker (one at a time, each on a free port, stopped before the next):

1. Fill: ``fill_sets`` full adpulse topic sets (own prefix each, via
   ``create_topics``), each with ``fill_events`` user-events and a 42-ad catalog,
   as earlier tests leave behind. On the first ``fill_workers`` sets a real
   worker also runs until it has applied every event and loaded the catalog, so
   the broker holds changelog topics, committed offsets and empty groups too.
2. Then ``workers`` times in a row, like tests on a session broker: a new prefix
   and app id, topics created, 42 ads published, a fresh worker (fresh data dir)
   started. Measured: start -> /health 200, then ready -> adpulse_catalog_ads
   reaches 42. Not there within ``stall_s``: a stall. The worker is then stopped
   (SIGTERM); its topics and its (now empty) group stay on the broker.

Evidence kept per worker, so a stall can be explained from the JSON: broker and
worker CPU (% of one core, from the worker's start until the catalog loaded or
the stall was called), /health then, per ad-catalog partition the broker's end
offset, the records a bare consumer reads and the offset the worker's group
committed, the group as the broker describes it (state, members, ad-catalog
partitions assigned), and for a stall or a failed start the log's last 20 lines
and its last warnings. Only comparisons within one run mean anything: the
machine is shared.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.group import MemberAssignment

from adpulse.bench import machine, machine_line
from adpulse.bench.broker import cpu_ticks
from adpulse.bench.warm import produce
from adpulse.broker import EmbeddedBroker, embedded_broker, free_port
from adpulse.catalogtool import publish, synthetic_ads
from adpulse.core.errors import ConfigError
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import EmbeddedKind, Settings
from adpulse.workerproc import WorkerProcess
from adpulse.workload import Workload, WorkloadModel
from streams.runtime.topicadmin import create_topics, plan

Log = Callable[[str], None]
ADS = 42  # the catalog size test_decisions waited for
_TAIL_LINES = 20
_WARNING = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")
# Evidence is taken no sooner than this after ready: Faust commits every 2.8 s, so by
# then a worker's committed offsets show what it has read.
_SETTLE_S = 3.5
_FILL_WORKER_TIMEOUT_S = 120.0  # a fill worker not done by then is recorded, not waited on


@dataclass(frozen=True)
class StartupBench:
    fill_sets: int = 30
    fill_events: int = 20_000
    fill_workers: int = 2
    workers: int = 15
    stall_s: float = 30.0
    ready_timeout_s: float = 60.0  # WorkerProcess.start's default, as the tests wait
    brokers: tuple[EmbeddedKind, ...] = ("kafka", "tansu")

    def __post_init__(self) -> None:
        if self.fill_sets < 0 or self.fill_events < 0 or self.fill_workers < 0:
            msg = "--fill-sets, --fill-events and --fill-workers must not be negative"
            raise ConfigError(msg)
        if self.fill_workers > self.fill_sets:
            msg = f"--fill-workers {self.fill_workers} is more than --fill-sets {self.fill_sets}"
            raise ConfigError(msg)
        if self.workers < 1 or self.stall_s <= 0 or self.ready_timeout_s <= 0:
            msg = "--workers must be at least 1, --stall-s and --ready-timeout-s positive"
            raise ConfigError(msg)
        if not self.brokers:
            msg = "--brokers names no broker: give kafka, tansu or kafka,tansu"
            raise ConfigError(msg)

    @classmethod
    def smoke(cls, **changes: Any) -> StartupBench:
        sizes = {"fill_sets": 2, "fill_events": 1_000, "fill_workers": 1, "workers": 2}
        return cls(**{**sizes, **changes})


def run(base: Settings, cfg: StartupBench, log: Log = print) -> dict[str, Any]:
    """Each broker of ``cfg.brokers`` in turn: fill it, then start workers one after another."""
    work = Path(tempfile.mkdtemp(prefix="adpulse-bench-startup-"))
    out: dict[str, Any] = {
        "fill_sets": cfg.fill_sets, "fill_events": cfg.fill_events,
        "fill_workers": cfg.fill_workers, "workers": cfg.workers, "stall_s": cfg.stall_s,
        "ready_timeout_s": cfg.ready_timeout_s, "ads": ADS, "brokers": list(cfg.brokers),
        "machine": machine(),
    }  # fmt: skip
    for kind in cfg.brokers:
        (work / kind).mkdir()
        s = base.with_(embedded=kind)
        with embedded_broker(s, port=free_port(), log_path=work / f"{kind}.log") as broker:
            s = s.with_(bootstrap=broker.bootstrap, embedded_broker=True, session_timeout_s=6.0)
            log(f"{kind}: {broker.name} on {broker.bootstrap}")
            fill = _fill(s, cfg, work / kind, log)
            log(f"  {_HEADER}")
            rows = []
            for n in range(1, cfg.workers + 1):
                rows.append(_start_one(s, broker, cfg, n, work / kind))
                log(f"  {_row(rows[-1])}")
        out[kind] = {"name": broker.name, "fill": fill, "workers": rows, **_summary(rows)}
        log(_broker_line(kind, out[kind]))
    if any(out[k]["stalls"] or out[k]["not_ready"] for k in cfg.brokers):
        out["log_dir"] = str(work)  # the full worker and broker logs, for a closer look
    else:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _settings(s: Settings, name: str, work: Path) -> Settings:
    """Settings of one topic set: own prefix, app id (= group id) and data dir."""
    tag = f"{name}-{time.monotonic_ns() % 10**9:09d}"
    return s.with_(topic_prefix=f"{tag}.", app_id=f"startup-{tag}", data_dir=work / tag)


def _topic_set(s: Settings, seed: int) -> None:
    create_topics(s)
    cats = Workload(WorkloadModel(), users=100, seed=seed).columns(500)["category"].tolist()
    publish(s, s.topic("ad-catalog"), synthetic_ads(ADS, cats, seed=seed))


def _fill(s: Settings, cfg: StartupBench, work: Path, log: Log) -> dict[str, Any]:
    """What earlier tests leave behind: topic sets with data, some read by a worker."""
    t0 = time.monotonic()
    workload = Workload(WorkloadModel(), users=2_000, seed=5)
    keys, values = workload.payloads(cfg.fill_events, int(time.time() * 1000), prefix="fill-")
    worker_runs = []
    for i in range(cfg.fill_sets):
        fs = _settings(s, f"fill{i}", work)
        _topic_set(fs, seed=1000 + i)
        if values:
            asyncio.run(produce(fs, fs.topic("user-events"), keys, values))
        if i < cfg.fill_workers:
            worker_runs.append(_fill_worker(fs, cfg.fill_events, work, i))
        if (i + 1) % 10 == 0 or i + 1 == cfg.fill_sets:
            log(f"  filled {i + 1}/{cfg.fill_sets} sets ({time.monotonic() - t0:.0f} s)")
    topics = cfg.fill_sets * len(plan(s))
    return {
        "sets": cfg.fill_sets, "events_per_set": cfg.fill_events, "topics": topics,
        "partitions": topics * s.partitions, "seconds": time.monotonic() - t0,
        "worker_runs": worker_runs,
    }  # fmt: skip


def _fill_worker(s: Settings, events: int, work: Path, i: int) -> dict[str, Any]:
    """A real worker on one fill set until it applied every event and loaded the catalog."""
    worker = WorkerProcess(s, work, name=f"fill-worker-{i}")
    t0 = time.monotonic()
    done: dict[str, Any] = {"set": i, "ok": False}
    try:
        worker.start(_FILL_WORKER_TIMEOUT_S)
        done["start_to_ready_s"] = time.monotonic() - t0
        worker.wait_until(
            lambda: worker.metric("adpulse_events_total") >= events
            and worker.metric("adpulse_catalog_ads") >= ADS,
            _FILL_WORKER_TIMEOUT_S, f"{events} events and {ADS} ads",
        )  # fmt: skip
        done["ok"] = True
    except AssertionError as exc:  # WorkerProcess's way to say timed out or exited
        done["error"] = str(exc).splitlines()[0]
    finally:
        worker.stop()
        shutil.rmtree(s.data_dir, ignore_errors=True)
    done["seconds"] = time.monotonic() - t0
    return done


def _start_one(
    s: Settings, broker: EmbeddedBroker, cfg: StartupBench, n: int, work: Path
) -> dict[str, Any]:
    """One fresh worker on fresh topics: start -> ready, then ready -> catalog loaded."""
    ws = _settings(s, f"w{n}", work)
    _topic_set(ws, seed=n)
    worker = WorkerProcess(ws, work, name=f"worker-{n}")
    row: dict[str, Any] = {
        "worker": n, "app_id": ws.app_id, "ready": False, "stalled": False,
        "start_to_ready_s": math.nan, "ready_to_catalog_s": math.nan,
    }  # fmt: skip
    assert broker.proc is not None
    t0, ticks = time.monotonic(), cpu_ticks(broker.proc.pid)
    try:
        try:
            worker.start(cfg.ready_timeout_s)
        except AssertionError as exc:  # timed out or exited before /health 200
            row.update(error=str(exc).splitlines()[0], **_log_evidence(worker))
            row.update(asyncio.run(catalog_view(ws)))
            return row
        ready = time.monotonic()
        assert worker.proc is not None
        row.update(ready=True, start_to_ready_s=ready - t0)
        row.update(_wait_catalog(worker, cfg.stall_s))
        row["broker_cpu_percent"] = _cpu_percent(broker.proc.pid, ticks, t0)
        row["worker_cpu_percent"] = _cpu_percent(worker.proc.pid, 0, t0)  # born after t0
        time.sleep(max(0.0, ready + _SETTLE_S - time.monotonic()))  # a commit after ready
        row.update(health=_health(worker), **asyncio.run(catalog_view(ws)))
        if row["stalled"]:
            row.update(_log_evidence(worker))
        return row
    finally:
        worker.stop()
        shutil.rmtree(ws.data_dir, ignore_errors=True)


def _cpu_percent(pid: int, ticks_then: int, then: float) -> float:
    """CPU of ``pid``'s process tree since ``then`` (ticks then given), % of one core."""
    ticks = cpu_ticks(pid) - ticks_then
    return ticks / os.sysconf("SC_CLK_TCK") / (time.monotonic() - then) * 100


def _wait_catalog(worker: WorkerProcess, stall_s: float) -> dict[str, Any]:
    """Poll adpulse_catalog_ads until it is 42 or ``stall_s`` passed."""
    t0 = time.monotonic()
    ads = 0.0
    while time.monotonic() - t0 < stall_s:
        ads = worker.metric("adpulse_catalog_ads")
        if ads >= ADS:
            break
        time.sleep(0.1)
    waited = time.monotonic() - t0
    stalled = ads < ADS
    return {"stalled": stalled, "ready_to_catalog_s": math.nan if stalled else waited,
            "catalog_ads": ads}  # fmt: skip


def _health(worker: WorkerProcess) -> str:
    try:
        status, body = worker.get("/health")
    except OSError as exc:
        return f"no answer ({exc})"
    return f"{status} {body.get('status') if isinstance(body, dict) else body}"


async def catalog_view(s: Settings) -> dict[str, Any]:
    """The worker's ad-catalog partitions as the broker and the worker see them.

    Per partition: the broker's end offset (tansu's can be short: streams/runtime/seal.py),
    how many records a bare consumer reads from the start within a few seconds,
    and the offset the worker's group committed. Plus the group's state, members
    and the ad-catalog partitions assigned to them (None: the broker did not
    report assignments). Evidence only: a failed question gives ``view_error``.
    """
    topic = s.topic("ad-catalog")
    tps = [TopicPartition(topic, p) for p in range(s.partitions)]
    try:
        group, committed = await _group(s, topic, tps)
        ends, read = await _read_all(s, tps)
    except Exception as exc:  # evidence only: never a reason to abort the run
        return {"view_error": f"{type(exc).__name__}: {exc}"}
    partitions = [
        {"partition": tp.partition, "end_offset": ends[tp], "records_read": read[tp],
         "committed": committed[tp].offset if tp in committed else None}
        for tp in tps
    ]  # fmt: skip
    return {"group": group, "partitions": partitions}


async def _group(
    s: Settings, topic: str, tps: list[TopicPartition]
) -> tuple[dict[str, Any], dict[TopicPartition, Any]]:
    """DescribeGroups (v0 fields: state, members) and the group's committed offsets."""
    admin = AIOKafkaAdminClient(**client_kwargs(s), request_timeout_ms=5_000)
    await admin.start()
    try:
        (resp,) = await admin.describe_consumer_groups([s.app_id])
        _error, _id, state, _ptype, _proto, members = resp.groups[0][:6]
        committed = await admin.list_consumer_group_offsets(s.app_id, partitions=tps)
    finally:
        await admin.close()
    assigned: int | None = 0
    for member in members:
        if not member[-1]:  # tansu answers DescribeGroups with empty assignments
            assigned = None
            break
        for name, parts in MemberAssignment.decode(member[-1]).assignment:
            assigned = (assigned or 0) + (len(parts) if name == topic else 0)
    group = {"state": state, "members": len(members), "catalog_partitions_assigned": assigned}
    return group, committed


async def _read_all(
    s: Settings, tps: list[TopicPartition]
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """End offsets, and the records a group-less consumer reads from the start in 5 s.

    The start comes from auto_offset_reset: a seek_to_beginning right after
    assign() races aiokafka's own reset and was seen to leave it at the end.
    """
    consumer = AIOKafkaConsumer(
        **client_kwargs(s), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        read = dict.fromkeys(tps, 0)
        deadline = time.monotonic() + 5.0
        while sum(read.values()) < ADS and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                read[tp] += len(records)
        return await consumer.end_offsets(tps), read
    finally:
        await consumer.stop()


def _log_evidence(worker: WorkerProcess) -> dict[str, Any]:
    """The log's last lines and its last warnings/errors: what the worker itself said."""
    warnings: list[str] = []
    try:
        with worker.log_path.open(errors="replace") as fh:
            warnings = [line.rstrip() for line in fh if _WARNING.search(line)][-5:]
    except OSError:
        pass
    return {"log_tail": worker.tail(_TAIL_LINES).splitlines(), "log_warnings": warnings}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ready = [r["start_to_ready_s"] for r in rows if r["ready"]]
    loaded = [r["ready_to_catalog_s"] for r in rows if r["ready"] and not r["stalled"]]

    def p50_max(xs: list[float]) -> tuple[float, float]:
        return (float(np.median(xs)), float(max(xs))) if xs else (math.nan, math.nan)

    (r50, rmax), (c50, cmax) = p50_max(ready), p50_max(loaded)
    return {
        "started": len(rows), "ready": len(ready), "not_ready": len(rows) - len(ready),
        "stalls": sum(1 for r in rows if r["stalled"]), "loaded": len(loaded),
        "start_to_ready_p50_s": r50, "start_to_ready_max_s": rmax,
        "ready_to_catalog_p50_s": c50, "ready_to_catalog_max_s": cmax,
    }  # fmt: skip


_HEADER = (
    f"{'worker':>6} {'start->ready_s':>14} {'ready->catalog_s':>16} {'broker_cpu%':>11} "
    f"{'worker_cpu%':>11} {'group':>18}  result"
)


def _row(r: dict[str, Any]) -> str:
    group = r.get("group") or {}
    assigned = group.get("catalog_partitions_assigned")
    shown = (
        f"{group['state']} {group['members']}m {'?' if assigned is None else assigned}p"
        if "state" in group
        else ("error" if "view_error" in r else "-")
    )
    result = "ok" if r["ready"] and not r["stalled"] else "not ready"
    if r["stalled"]:
        result = f"stalled at {r['catalog_ads']:.0f}/{ADS} ads"
    return (
        f"{r['worker']:6d} {r['start_to_ready_s']:14.1f} {r['ready_to_catalog_s']:16.2f} "
        f"{r.get('broker_cpu_percent', math.nan):11.0f} "
        f"{r.get('worker_cpu_percent', math.nan):11.0f} {shown:>18}  {result}"
    )


def _fill_line(f: dict[str, Any]) -> str:
    runs = f["worker_runs"]
    ok = sum(1 for w in runs if w["ok"])
    return (
        f"fill: {f['sets']} sets x {f['events_per_set']:,} events ({f['topics']} topics, "
        f"{f['partitions']:,} partitions) in {f['seconds']:.0f} s; a real worker ran on "
        f"{len(runs)} of them ({ok} finished)"
    )


def format_tables(res: dict[str, Any]) -> str:
    """Per broker: how it was filled, one row per worker, then its summary line."""
    out = [
        f"startup: {res['workers']} workers in a row per broker, stall = {res['ads']} ads "
        f"not loaded {res['stall_s']:g} s after ready (only comparisons within one run)"
    ]
    for kind in res["brokers"]:
        b = res[kind]
        out += ["", f"{kind} ({b['name']})", _fill_line(b["fill"]), _HEADER]
        out += [_row(r) for r in b["workers"]]
        out.append(_broker_line(kind, b))
        for r in b["workers"]:
            if r["stalled"] or not r["ready"]:
                out.append(f"  worker {r['worker']} ({r['app_id']}): health {r.get('health')}, "
                           f"last warnings: {r.get('log_warnings') or 'none'}")  # fmt: skip
                out.append(f"    ad-catalog: {_partitions(r)}")
    group = "group: state, members (m), ad-catalog partitions assigned (p; ?: not reported)"
    return "\n".join([*out, "", group])


def _partitions(r: dict[str, Any]) -> str:
    """``p0 end 7 read 7 committed 7; ...`` or the error that kept the facts away."""
    if "partitions" not in r:
        return str(r.get("view_error", "not asked"))
    return "; ".join(
        f"p{p['partition']} end {p['end_offset']} read {p['records_read']} "
        f"committed {p['committed']}"
        for p in r["partitions"]
    )


def _broker_line(kind: str, b: dict[str, Any]) -> str:
    return (
        f"{kind}: {b['started']} started, {b['ready']} ready, {b['stalls']} stalled; "
        f"start->ready p50 {b['start_to_ready_p50_s']:.1f} s "
        f"max {b['start_to_ready_max_s']:.1f} s; "
        f"ready->catalog p50 {b['ready_to_catalog_p50_s']:.2f} s "
        f"max {b['ready_to_catalog_max_s']:.2f} s"
    )


def result_line(res: dict[str, Any]) -> str:
    parts = "; ".join(_broker_line(k, res[k]) for k in res["brokers"])
    return (
        f"startup: {res['fill_sets']} fill sets x {res['fill_events']:,} events per broker; "
        f"{parts}; {machine_line(res['machine'])}"
    )
