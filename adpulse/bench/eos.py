"""``adpulse bench eos``: Faust's ``exactly_once`` against ``at_least_once`` on Apache Kafka.

Why: adpulse keeps exactness by idempotent state (dedupe by event id and applied
offsets, proven by kill -9 tests). Kafka transactions through Faust's
``processing_guarantee="exactly_once"`` are the alternative the embedded Apache
Kafka now allows, but faust-streaming has open reports of duplicates under it and
adpulse's worker writes changelogs around Faust's transaction manager
(streams/runtime/tablewriter.py). So this measures a minimal Faust app, not adpulse.

The app (:data:`APP_SOURCE`, run as ``python -m faust -A eosapp worker``) counts
events per key in a RocksDB table with a changelog and sends one output record
per event. Per guarantee, each phase on fresh topics and a fresh app id:

* cost: N pre-produced events, no kills. Events/s = N / (last output record
  counted - the agent's first event), counted by a ``read_committed`` consumer of
  the output topic (never end offsets): what a downstream reader sees.
* crash: N events, the worker SIGKILLed ``kills`` times at random progress points
  (each after that process's first event) and restarted on its data dir, then
  left to finish. Checked: one output record per input event (``read_committed``;
  duplicates and losses), and the table's last changelog value per key (read to
  its end, ``read_committed``) against the true count per key.

A worker that crashes or stalls is a result, not an exception: the phase records
the reason and the ERROR/WARNING lines of the worker's log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from adpulse.bench import machine, machine_line
from adpulse.broker import embedded_broker, free_port
from adpulse.core.errors import ConfigError
from adpulse.core.settings import Settings
from adpulse.kafkabroker import KAFKA_VERSION

GUARANTEES = ("at_least_once", "exactly_once")
KINDS = ("cost", "crash")  # the phases, each run once per guarantee
APP_MODULE = "eosapp"
APP_SOURCE = """\
import os
import time

import faust

env = os.environ
session = float(env["EOS_SESSION_TIMEOUT_S"])
app = faust.App(
    env["EOS_APP_ID"], broker="kafka://" + env["EOS_BOOTSTRAP"], store="rocksdb://",
    datadir=env["EOS_DATA_DIR"], processing_guarantee=env["EOS_GUARANTEE"],
    topic_partitions=int(env["EOS_PARTITIONS"]), consumer_auto_offset_reset="earliest",
    broker_session_timeout=session, broker_heartbeat_interval=max(0.5, session / 6),
    web_enabled=False,
)
raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
source = app.topic(env["EOS_IN"], **raw)
out = app.topic(env["EOS_OUT"], **raw)
counts = app.Table("counts", default=int, key_type=bytes, value_type=int)
seen = False

@app.agent(source)
async def count(stream):
    global seen
    async for key, value in stream.items():
        if not seen:  # the bench times from this process's first event
            seen = True
            with open(env["EOS_MARK"], "w") as f:
                f.write(repr(time.time()))
        counts[key] += 1
        await out.send(key=key, value=value)
"""
_LOG_PREFIX = re.compile(r"^(\x1b\[[0-9;?]*[A-Za-z])*\[[^\]]*\] \[\d+\] ")
_DIGITS = re.compile(r"\d+(\.\d+)?")
_PROBLEM = re.compile(r"\[(ERROR|CRITICAL|WARNING)\]|Traceback|Error\b|Exception\b")


@dataclass(frozen=True)
class EosBench:
    events: int = 50_000
    kills: int = 3
    keys: int = 64
    partitions: int = 4
    session_timeout_s: float = 6.0  # a killed member leaves the group after this
    stall_s: float = 90.0  # no new output for this long while running: the phase failed
    settle_s: float = 7.0  # after the last event: time for late duplicates (> 2 commits)
    seed: int = 7

    def __post_init__(self) -> None:
        if self.events < 100 or self.kills < 0 or self.keys < 1:
            msg = "--events must be at least 100 and --kills not negative"
            raise ConfigError(msg)

    @classmethod
    def smoke(cls, **changes: Any) -> EosBench:
        return cls(**{"events": 2_000, "kills": 1, "session_timeout_s": 3.0, "stall_s": 30.0,
                      "settle_s": 3.0, **changes})  # fmt: skip


def run(base: Settings, cfg: EosBench, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both guarantees, the cost phase then the crash phase, on one embedded Apache Kafka."""
    tmp = Path(tempfile.mkdtemp(prefix="adpulse-bench-eos-"))
    (tmp / f"{APP_MODULE}.py").write_text(APP_SOURCE)
    out: dict[str, Any] = {**asdict(cfg), "broker": f"Apache Kafka {KAFKA_VERSION}",
                           "guarantees": list(GUARANTEES), "machine": machine()}  # fmt: skip
    s = base.with_(embedded="kafka")
    with embedded_broker(s, port=free_port(), log_path=tmp / "broker.log") as broker:
        log(f"eos: {broker.name} on {broker.bootstrap}; worker logs in {tmp}")
        bench = _Bench(cfg, broker.bootstrap, tmp, log)
        asyncio.run(bench.create_topics())
        for kind in KINDS:
            out[kind] = {g: asyncio.run(bench.phase(g, kind)) for g in GUARANTEES}
    alo, eos = (out["cost"][g]["events_per_s"] for g in GUARANTEES)
    out["eos_over_alo_events_per_s"] = eos / alo if alo and eos else math.nan
    if all(out[k][g]["ok"] for k in KINDS for g in GUARANTEES):
        shutil.rmtree(tmp, ignore_errors=True)  # kept on a failure: the error names its log
    return out


def _name(kind: str, guarantee: str) -> str:
    return f"eos-{kind}-{guarantee.replace('_', '-')}"  # also the Faust app id


class _Bench:
    def __init__(self, cfg: EosBench, bootstrap: str, tmp: Path, log: Callable[[str], None]):
        self.cfg, self.bootstrap, self.tmp, self.log = cfg, bootstrap, tmp, log
        self.rng = random.Random(cfg.seed)

    async def create_topics(self) -> None:
        """Every phase's input and output topics, each partition's leader serving on return.

        A new partition answers NotLeader for a moment after its creation; aiokafka
        retries and logs each retry. One quiet ListOffsets round waits that out here.
        """
        names = [f"{_name(k, g)}-{io}" for k in KINDS for g in GUARANTEES for io in ("in", "out")]
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, self.cfg.partitions, 1) for t in names])
        finally:
            await admin.close()
        aiokafka_log = logging.getLogger("aiokafka")
        level = aiokafka_log.level
        aiokafka_log.setLevel(logging.CRITICAL)
        try:
            async with AIOKafkaConsumer(bootstrap_servers=self.bootstrap) as probe:
                await probe.end_offsets([TopicPartition(t, p) for t in names
                                         for p in range(self.cfg.partitions)])  # fmt: skip
        finally:
            aiokafka_log.setLevel(level)

    async def phase(self, guarantee: str, kind: str) -> dict[str, Any]:
        cfg, w, t0 = self.cfg, _Worker(self, guarantee, _name(kind, guarantee)), time.monotonic()
        truth = await self._produce(w.in_topic)
        tally = _Tally(cfg.events)
        out = _Reader(self.bootstrap, w.out_topic, cfg.partitions, tally.count)
        await out.start(follow=True)
        res: dict[str, Any] = {"ok": True, "error": None, "events_per_s": math.nan}
        try:
            w.spawn()
            kills = cfg.kills if kind == "crash" else 0
            for target in sorted(self.rng.uniform(0.1, 0.9) for _ in range(kills)):

                def due(t: float = target) -> bool:  # this process has events, output past t
                    return tally.distinct >= t * cfg.events and w.first_event() is not None

                await self._wait(w, tally, due)
                await asyncio.sleep(self.rng.uniform(0.0, 0.5))
                w.kill(tally.distinct)
                w.spawn()
            t_done = await self._wait(w, tally, lambda: tally.distinct >= cfg.events)
            first = w.first_event()
            w.note_restart(first)
            if kind == "cost" and first is not None:
                res.update(seconds=t_done - first, startup_s=first - w.spawned_at)
                res["events_per_s"] = cfg.events / res["seconds"]
            await asyncio.sleep(cfg.settle_s)  # late duplicates would arrive now
        except _PhaseFailed as exc:
            res.update(ok=False, error=str(exc))
            self.log(f"{w.name}: FAILED: {exc}")
        finally:
            w.stop()
            await out.drain()
        last = _Last()
        changelog = _Reader(self.bootstrap, w.changelog, cfg.partitions, last.keep)
        if await changelog.start(follow=False):  # absent when the worker never made its table
            await changelog.drain()
        res.update(kills=w.kills, output=tally.summary(), table=_compare(truth, last))
        o, wrong = res["output"], res["table"]["keys_wrong"]
        exact = o["duplicates"] == o["lost"] == o["unknown"] == wrong == 0
        res.update(exact=res["ok"] and exact, log_problems=w.problems())
        self.log(f"{w.name} ({time.monotonic() - t0:.0f} s): {_row(guarantee, res)}")
        return res

    async def _wait(self, w: _Worker, tally: _Tally, done: Callable[[], bool]) -> float:
        """Until ``done()``; a worker that exits or whose output stalls fails the phase."""
        last, since = -1, time.monotonic()
        while not done():
            if tally.records != last:
                last, since = tally.records, time.monotonic()
            code = w.proc.poll() if w.proc else None
            if code is not None:
                msg = f"worker exited with code {code} at {tally.distinct} of {self.cfg.events}"
                raise _PhaseFailed(msg)
            if time.monotonic() - since > self.cfg.stall_s:
                msg = (f"no new output for {self.cfg.stall_s:g} s at {tally.distinct} of "
                       f"{self.cfg.events} events")  # fmt: skip
                raise _PhaseFailed(msg)
            await asyncio.sleep(0.02)
        return time.time()

    async def _produce(self, topic: str) -> dict[bytes, int]:
        """Event i: key ``k{i % keys}``, value ``i``; returns the true count per key."""
        truth: dict[bytes, int] = {}
        async with AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5) as producer:
            for i in range(self.cfg.events):
                key = f"k{i % self.cfg.keys:03d}".encode()
                truth[key] = truth.get(key, 0) + 1
                await producer.send(topic, str(i).encode(), key=key)
            await producer.flush()
        return truth


class _PhaseFailed(Exception):
    """The worker crashed or stalled: recorded in the result, never raised out of run()."""


class _Worker:
    """One Faust worker process of the app, restarted on the same data dir after kills."""

    def __init__(self, bench: _Bench, guarantee: str, name: str) -> None:
        self.bench, self.guarantee, self.name = bench, guarantee, name
        self.in_topic, self.out_topic = f"{name}-in", f"{name}-out"
        self.changelog = f"{name}-counts-changelog"  # Faust: {app id}-{table}-changelog
        self.mark = bench.tmp / f"{name}.first"
        self.log_path = bench.tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.kills: list[dict[str, Any]] = []

    def spawn(self) -> None:
        b = self.bench
        self.mark.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(b.tmp), "EOS_APP_ID": self.name,
               "EOS_BOOTSTRAP": b.bootstrap, "EOS_DATA_DIR": str(b.tmp / f"{self.name}.data"),
               "EOS_GUARANTEE": self.guarantee, "EOS_PARTITIONS": str(b.cfg.partitions),
               "EOS_SESSION_TIMEOUT_S": str(b.cfg.session_timeout_s), "EOS_IN": self.in_topic,
               "EOS_OUT": self.out_topic, "EOS_MARK": str(self.mark)}  # fmt: skip
        cmd = [sys.executable, "-m", "faust", "-A", APP_MODULE, "worker", "-l", "warn"]
        with open(self.log_path, "ab") as log:
            self.spawned_at = time.time()
            self.proc = subprocess.Popen(cmd, cwd=b.tmp, env=env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)  # fmt: skip

    def first_event(self) -> float | None:
        """Wall time of this process's first event (None before it has one)."""
        try:
            return float(self.mark.read_text())
        except (OSError, ValueError):
            return None

    def kill(self, distinct: int) -> None:
        """SIGKILL; ``distinct``: event ids in the committed output by then."""
        assert self.proc is not None
        first = self.first_event() or time.time()
        self.note_restart(first)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        during = distinct < self.bench.cfg.events
        self.kills.append({"at_output": distinct, "during_processing": during,
                           "after_first_event_s": round(time.time() - first, 3)})  # fmt: skip

    def note_restart(self, first: float | None) -> None:
        """The last kill's restart lasted until this process's first event."""
        if self.kills and first is not None:
            self.kills[-1]["restart_s"] = round(first - self.spawned_at, 3)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def problems(self, most: int = 8) -> list[str]:
        """ERROR/WARNING/exception lines of the worker's log, one per kind (numbers aside)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        lines = (_LOG_PREFIX.sub("", line.strip())[:300] for line in text.splitlines())
        kinds = {_DIGITS.sub("#", t): t for t in reversed(list(lines)) if _PROBLEM.search(t)}
        return list(reversed(kinds.values()))[:most]  # the first of each kind


Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


class _Reader:
    """A ``read_committed`` consumer of every partition of a topic from its beginning."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, on: Callable[[Record], None]):
        self.topic, self.on = topic, on
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                         isolation_level="read_committed")  # fmt: skip
        self.task: asyncio.Task[None] | None = None

    async def start(self, follow: bool) -> bool:
        """False (and stopped) when the topic does not exist; ``follow``: read in the background."""
        await self.consumer.start()
        if self.topic not in await self.consumer.topics():
            await self.consumer.stop()
            return False
        self.consumer.assign(self.tps)
        await self.consumer.seek_to_beginning(*self.tps)
        if follow:
            self.task = asyncio.create_task(self._follow())
        return True

    async def _follow(self) -> None:
        while True:
            await self._poll()

    async def _poll(self) -> None:
        for records in (await self.consumer.getmany(timeout_ms=100)).values():
            for r in records:
                self.on(r)

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Read on to the last stable offsets as of now, then stop."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        end = await self.consumer.end_offsets(self.tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all([await self.consumer.position(tp) >= end[tp] for tp in self.tps]):
                break
            await self._poll()
        await self.consumer.stop()


class _Tally:
    """How often each event id came back on the output topic."""

    def __init__(self, events: int) -> None:
        self.seen = [0] * events
        self.records = self.distinct = self.unknown = 0

    def count(self, r: Record) -> None:
        self.records += 1
        i = int(r.value or b"-1")
        if not 0 <= i < len(self.seen):
            self.unknown += 1
            return
        self.distinct += self.seen[i] == 0
        self.seen[i] += 1

    def summary(self) -> dict[str, Any]:
        return {"records": self.records, "distinct": self.distinct,
                "duplicates": sum(n - 1 for n in self.seen if n > 1),
                "duplicated_events": sum(n > 1 for n in self.seen),
                "lost": len(self.seen) - self.distinct, "unknown": self.unknown}  # fmt: skip


class _Last(dict[bytes, int]):
    """The table's value per key from its changelog (JSON int): the last record wins."""

    def keep(self, r: Record) -> None:
        if r.key is not None and r.value is not None:
            self[r.key] = int(json.loads(r.value))


def _compare(truth: dict[bytes, int], table: dict[bytes, int]) -> dict[str, int]:
    """Table against the true count per key; over and under are summed counts."""
    diffs = [table.get(k, 0) - n for k, n in truth.items()]
    return {"keys": len(truth), "keys_in_changelog": len(table),
            "keys_wrong": sum(d != 0 for d in diffs) + len(set(table) - set(truth)),
            "over": sum(d for d in diffs if d > 0),
            "under": -sum(d for d in diffs if d < 0)}  # fmt: skip


_HEADER = (f"{'phase':6} {'guarantee':14} {'events/s':>8} {'kills':>5} {'restart_s':>9} "
           f"{'out_dup':>7} {'out_lost':>8} {'tbl_keys_wrong':>14} {'tbl_over':>8} "
           f"{'tbl_under':>9}  result")  # fmt: skip


def _row(guarantee: str, r: dict[str, Any]) -> str:
    o, t, kills = r["output"], r["table"], r["kills"]
    rate = "" if math.isnan(r["events_per_s"]) else f"{r['events_per_s']:,.0f}"
    restarts = [k["restart_s"] for k in kills if "restart_s" in k]
    restart = f"{sum(restarts) / len(restarts):.1f}" if restarts else ""
    verdict = "exact" if r["exact"] else ("FAILED" if not r["ok"] else "NOT exact")
    return (f"{guarantee:14} {rate:>8} {len(kills):5d} {restart:>9} {o['duplicates']:7d} "
            f"{o['lost']:8d} {t['keys_wrong']:14d} {t['over']:8d} {t['under']:9d}  "
            f"{verdict}")  # fmt: skip


def format_table(res: dict[str, Any]) -> str:
    """Cost and kill rows per guarantee, the ratio, then failures and worker log lines."""
    out = [f"eos: {res['events']:,} events, {res['keys']} keys, {res['partitions']} partitions, "
           f"{res['broker']}, {machine_line(res['machine'])} (only ratios within one run "
           "compare; restart_s: mean kill -> next process's first event)", _HEADER]  # fmt: skip
    out += [f"{k:6} {_row(g, res[k][g])}" for k in KINDS for g in res["guarantees"]]
    out.append(f"exactly_once / at_least_once events/s: {res['eos_over_alo_events_per_s']:.2f}x")
    for k, g in ((k, g) for k in KINDS for g in res["guarantees"]):
        r = res[k][g]
        out += [f"{k} {g} failed: {r['error']}"] if not r["ok"] else []
        out += [f"  {k} {g} log: {line}" for line in r["log_problems"]]
    return "\n".join(out)
