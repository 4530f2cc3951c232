"""``adpulse bench rebalance``: two workers split the partitions; one stops; the other takes over.

Setup: a catalog, ``users`` users with interest state, worker A, then worker B
on the same topics (same app id). Ad requests arrive at ``rate``/s throughout;
this process reads every decision back. Checked, then measured:
  * both workers hold partitions of ad-requests (each worker's
    ``adpulse_consumer_lag_messages`` series name the partitions it reads) and
    both serve decisions (each one's ``adpulse_decisions_total`` grows, and the
    decisions come from every partition);
  * B is stopped (SIGTERM; then, in a second round with B restarted, SIGKILL)
    while requests keep coming; A takes over B's partitions, restoring their
    state from the changelogs (the standby copy it kept, then the tail);
  * a user of a moved partition is served by A with the interest state B
    served before the stop (every field but the vector decayed to now);
  * the pause: the longest gap between consecutive decisions read back, and the
    outage of the moved partitions (longest gap between their decisions), split
    into what it is made of, from A's log: B's exit, the group's rejoin (on the
    embedded broker a join completes only after the old member's session times
    out), A's recovery, and the first decision after it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import DefaultPartitioner

from adpulse.bench import machine, machine_line, spread
from adpulse.bench.requests import decision_clients, pick, request_body
from adpulse.bench.warm import applied, fresh_settings, produce
from adpulse.catalogtool import publish, synthetic_ads
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from adpulse.workload import Workload, WorkloadModel

WAIT_S = 120.0  # bench-ok: wait bound for joins and takeovers, not a timing claim
STALL_S = 30.0  # bench-ok: a worker that applied nothing this long after ready is stalled


@dataclass(frozen=True)
class RebalanceBench:
    rate: float = 200.0
    users: int = 2_000
    warm_events: int = 20_000
    ads: int = 200
    candidates: int = 20
    session_timeout_s: float = 3.0
    kill: bool = True
    repeats: int = 3  # rounds per signal: a pause is reported as median (min-max)

    @classmethod
    def smoke(cls) -> RebalanceBench:
        return cls(rate=50.0, users=200, warm_events=1_000, kill=False, repeats=1)


class Decisions:
    """Offers requests at a steady rate and reads decisions back (one asyncio loop, a thread)."""

    def __init__(self, s: Settings, cfg: RebalanceBench, ad_ids: list[str]) -> None:
        self.s, self.cfg, self.ad_ids = s, cfg, ad_ids
        self.seen: list[tuple[float, int]] = []  # (read at, request partition)
        self.part_of: dict[str, int] = {}
        self.stop = False

    async def run(self) -> None:
        s, cfg = self.s, self.cfg
        async with decision_clients(s, fetch_max_wait_ms=5) as (consumer, producer):
            watcher = asyncio.create_task(self._watch(consumer))
            rng, parts = np.random.default_rng(7), list(range(s.partitions))
            partitioner, i, start = DefaultPartitioner(), 0, time.perf_counter()
            while not self.stop:
                i += 1
                user = f"u{int(rng.integers(0, cfg.users))}"
                key = user.encode()
                rid = f"rb-{i}"
                self.part_of[rid] = partitioner(key, parts, parts)
                body = request_body(rid, user, pick(rng, self.ad_ids, cfg.candidates),
                                    int(time.time() * 1000))  # fmt: skip
                await producer.send(s.topic("ad-requests"), body, key=key)
                await asyncio.sleep(max(0.0, start + i / cfg.rate - time.perf_counter()))
            watcher.cancel()

    async def _watch(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for rec in records:
                    d = json.loads(rec.value)
                    if d.get("no_fill_reason") == "shed":  # answered unscored: ends no pause
                        continue
                    part = self.part_of.get(d.get("request_id", ""))
                    if part is not None:
                        self.seen.append((now, part))


def run(base: Settings, cfg: RebalanceBench, log: Any = print) -> dict[str, Any]:
    workload = Workload(WorkloadModel(), users=cfg.users, seed=5)
    with tempfile.TemporaryDirectory(prefix="adpulse-bench-") as tmp:
        # each worker gets its own data dir below
        s = fresh_settings(base, Path(tmp), session_timeout_s=cfg.session_timeout_s)
        ads = synthetic_ads(cfg.ads, workload.columns(5_000)["category"].tolist(), seed=3)
        publish(s, s.topic("ad-catalog"), ads)
        keys, values = workload.payloads(cfg.warm_events, int(time.time() * 1000), prefix="warm")
        asyncio.run(produce(s, s.topic("user-events"), keys, values))
        a = WorkerProcess(s.with_(data_dir=Path(tmp) / "a"), Path(tmp), name="worker-a").start()
        b: WorkerProcess | None = None
        decisions = Decisions(s, cfg, [ad["ad_id"] for ad in ads])
        loop = asyncio.new_event_loop()
        offer = threading.Thread(target=loop.run_until_complete, args=(decisions.run(),))
        try:
            stall_restarts = _first_events(a, log)
            a.wait_until(lambda: applied(a) >= cfg.warm_events, WAIT_S, "warm interest state")
            offer.start()
            rounds = []
            signals = ("SIGTERM", "SIGKILL") if cfg.kill else ("SIGTERM",)
            for r in range(cfg.repeats):
                for how in signals:
                    b = WorkerProcess(s.with_(data_dir=Path(tmp) / f"b{r}-{how}"), Path(tmp),
                                      name=f"worker-b{r}-{how}")  # fmt: skip
                    b.start(timeout=WAIT_S)
                    rounds.append(_round(a, b, decisions, how, s, log))
        finally:
            decisions.stop = True
            if offer.is_alive():
                offer.join(30)
            for w in (a, b):
                if w is not None:
                    w.stop()
    return {
        "rounds": rounds,
        "by_signal": by_signal(rounds),
        "repeats": cfg.repeats,
        "pause_s": max(r["longest_gap_s"] for r in rounds),
        "moved_outage_s": max(r["moved_outage_s"] for r in rounds),
        "state_equal": all(r["state_equal"] for r in rounds),
        "offered_per_s": cfg.rate,
        "session_timeout_s": cfg.session_timeout_s,
        "stall_restarts": stall_restarts,
        "target_pause_s": 10.0,
        "users": cfg.users,
        "machine": machine(),
    }


def by_signal(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per signal: rounds, and the longest gap and the moved partitions' outage as
    median (min-max)."""
    out: dict[str, dict[str, Any]] = {}
    for how in dict.fromkeys(r["signal"] for r in rounds):
        mine = [r for r in rounds if r["signal"] == how]
        out[how] = {"rounds": len(mine),
                    "longest_gap_s": spread([r["longest_gap_s"] for r in mine]),
                    "moved_outage_s": spread([r["moved_outage_s"] for r in mine])}  # fmt: skip
    return out


def _first_events(a: WorkerProcess, log: Any) -> int:
    """Wait for A's first applied events; restart A once if it stalls (returns restarts).

    Seen here, rarely, after a long session on one embedded broker: a worker
    reports ready, holds its partitions and then fetches nothing at all (no
    consumer-lag series, not even the catalog). Unexplained yet (docs/reference.md, "The
    embedded broker"); a restart consumes normally. Counted in the report.
    """
    try:
        a.wait_until(lambda: applied(a) > 0, STALL_S, "first events applied")
        return 0
    except AssertionError:
        log(f"  worker A applied nothing {STALL_S:.0f} s after ready (fetch stall): restarting it")
        a.stop()
        a.start(timeout=WAIT_S)
        a.wait_until(lambda: applied(a) > 0, WAIT_S, "first events applied after a restart")
        return 1


def _round(
    a: WorkerProcess, b: WorkerProcess, d: Decisions, how: str, s: Settings, log: Any
) -> dict[str, Any]:
    everything = set(range(s.partitions))
    split: dict[str, set[int]] = {}

    def is_split() -> bool:
        split["a"], split["b"] = _partitions(a, s), _partitions(b, s)
        return bool(split["a"] and split["b"] and split["a"] | split["b"] == everything
                    and not split["a"] & split["b"])  # fmt: skip

    a.wait_until(is_split, WAIT_S, "both workers holding partitions of ad-requests")
    served = (_decided(a), _decided(b))
    mark = len(d.seen)
    a.wait_until(lambda: _decided(a) > served[0] and _decided(b) > served[1]
                 and {p for _, p in d.seen[mark:]} == everything, WAIT_S,
                 "decisions from both workers and every partition")  # fmt: skip
    moved = split["b"]
    user = next(f"u{u}" for u in range(10**6) if _partition(f"u{u}", s) in moved
                and b.interest(f"u{u}") is not None)  # fmt: skip
    before = _stable(b.interest(user))
    log(f"  {how}: A holds {sorted(split['a'])}, B holds {sorted(moved)}; stopping B")
    assert b.proc is not None
    stopped_at, stopped_wall = time.perf_counter(), time.time()
    b.proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
    b.proc.wait(60)
    exited = time.perf_counter() - stopped_at
    gone = stopped_at + exited  # from here on only A can decide for B's partitions

    def taken_over() -> bool:
        moved_now = any(t > gone and p in moved for t, p in d.seen[mark:])
        return moved_now and _partitions(a, s) == everything

    a.wait_until(taken_over, WAIT_S, "A serving B's partitions")
    first_moved = min(t for t, p in d.seen[mark:] if t > gone and p in moved)
    time.sleep(1.0)  # a second of decisions after the takeover, for the gaps
    after = _stable(a.interest(user))
    times = [t for t, _ in d.seen[mark:]]
    moved_times = [t for t, p in d.seen[mark:] if p in moved]
    phases = _phases(a.log_path, stopped_wall)
    out = {
        "signal": how,
        "a_partitions": sorted(split["a"]),
        "b_partitions": sorted(moved),
        "longest_gap_s": _longest_gap(times),
        "moved_outage_s": _longest_gap(moved_times),
        "stopped_exit_s": exited,
        **phases,
        "first_moved_decision_s": first_moved - stopped_at,
        "state_equal": before == after and before is not None,
        "user_checked": user,
    }
    log(f"  {how}: longest gap {out['longest_gap_s']:.2f} s, moved partitions' outage "
        f"{out['moved_outage_s']:.2f} s (B exited {exited:.2f} s, A rejoined "
        f"{phases['rejoined_s']:.2f} s, recovered {phases['recovered_s']:.2f} s, first "
        f"decision by A on them {out['first_moved_decision_s']:.2f} s after the signal); state "
        f"equal: {out['state_equal']}")  # fmt: skip
    return out


def result_line(res: dict[str, Any]) -> str:
    parts = [
        f"{r['signal']} gap {r['longest_gap_s']:.1f} s (moved partitions {r['moved_outage_s']:.1f}"
        f" s: exit {r['stopped_exit_s']:.1f}, rejoin {r['rejoined_s']:.1f}, recovered "
        f"{r['recovered_s']:.1f}, first decision {r['first_moved_decision_s']:.1f})"
        for r in res["rounds"]
    ]
    for how, f in res.get("by_signal", {}).items():
        g, o = f["longest_gap_s"], f["moved_outage_s"]
        parts.append(f"{how} over {f['rounds']}: gap median {g['median']:.1f} s "
                     f"({g['min']:.1f}-{g['max']:.1f}), moved {o['median']:.1f} s "
                     f"({o['min']:.1f}-{o['max']:.1f})")  # fmt: skip
    return (
        f"rebalance: at {res['offered_per_s']:,.0f} req/s, session timeout "
        f"{res['session_timeout_s']:.0f} s: {'; '.join(parts)}; state restored equal: "
        f"{res['state_equal']} (target pause <= 10 s); {machine_line(res['machine'])}"
    )


def _partitions(w: WorkerProcess, s: Settings) -> set[int]:
    """Partitions of ad-requests the worker reads, from its consumer-lag series; none while
    its web server does not answer (a restarted worker between spawn and listen)."""
    try:
        _, text = w.get("/metrics")
    except OSError:  # urllib's URLError is an OSError
        return set()
    topic = s.topic("ad-requests")
    out = set()
    for line in str(text).splitlines():
        if line.startswith("adpulse_consumer_lag_messages{") and f'topic="{topic}"' in line:
            m = re.search(r'partition="(\d+)"', line)
            if m:
                out.add(int(m.group(1)))
    return out


def _decided(w: WorkerProcess) -> float:
    return w.metric("adpulse_decisions_total")


def _partition(user: str, s: Settings) -> int:
    parts = list(range(s.partitions))
    return int(DefaultPartitioner()(user.encode(), parts, parts))


def _stable(body: dict[str, Any] | None) -> dict[str, Any] | None:
    """The interest state without the vector decayed to now (it moves with the clock)."""
    return None if body is None else {k: v for k, v in body.items() if k != "vector_now"}


def _longest_gap(times: list[float]) -> float:
    ts = sorted(times)
    return max((b - a for a, b in itertools.pairwise(ts)), default=float("nan"))


_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def _phases(log_path: Path, since: float) -> dict[str, float]:
    """Seconds from the stop to A's rejoin (its changelogs sealed / rebalance handled) and to
    its recovery completing, read off A's log."""
    tz = datetime.now().astimezone().tzinfo
    rejoined = recovered = float("nan")
    for line in log_path.read_text(errors="replace").splitlines():
        m = _LOG_TIME.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=tz).timestamp()
        if t < since:
            continue
        if math.isnan(rejoined) and "Executing _on_partitions_assigned" in line:
            rejoined = t - since
        elif not math.isnan(rejoined) and "Recovery complete" in line:
            recovered = t - since
            break
    return {"rejoined_s": rejoined, "recovered_s": recovered}
