"""POST /decide's queue (streams/serve.py) and the deadline rule both entry points share.

The service runs on a real event loop with a recording ``decide`` in place of the
worker; the deadline rule runs in the real decision stage (streams/decide.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from adpulse.core.settings import Settings
from schemas.messages import AdRequest
from streams.deadletter import Raw
from streams.decide import StateReaders
from streams.serve import (
    _TICK_IDLE_S,
    _TICK_S,
    DecideService,
    IngestGuard,
    Reply,
    owner_map,
    user_partition,
)
from tests.unit.test_pacing_stage import DAY0, Tables, requests, settings, stage


def body(i: int, **extra: Any) -> bytes:
    req = {"request_id": f"r{i}", "user_id": f"u{i}", "placement": "home", "ts": 1, **extra}
    return json.dumps(req).encode()


class Recorder:
    """A ``decide`` that answers each request with its id and records the runs."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.runs: list[list[str]] = []
        self.delay_s = delay_s
        self.fail = fail
        self.sends: list[asyncio.Future[Any]] = []

    def __call__(
        self, reqs: Sequence[tuple[AdRequest, Raw]]
    ) -> tuple[list[dict[str, Any]], Any]:
        self.runs.append([r.request_id for r, _ in reqs])
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("scorer exploded")
        sends = [asyncio.get_running_loop().create_future() for _ in reqs]
        self.sends += sends

        async def send() -> list[Any]:
            return list(sends)

        return [{"request_id": r.request_id, "start": raw.timestamp_ms} for r, raw in reqs], send


def service(
    rec: Recorder,
    failures: list[BaseException] | None = None,
    clock: Clock | None = None,
    **kw: Any,
) -> DecideService:
    s = Settings(**kw)
    sink = failures if failures is not None else []
    if clock is None:
        return DecideService(s, rec, lambda: 10, sink.append)
    return DecideService(s, rec, lambda: 10, sink.append, clock.ticked, clock)


class Clock:
    """The service's clock, moved by the test: time passes only when it says so.

    The lateness sampler's ticks are still scheduled on the event loop; each one
    reads this clock and is recorded, so the test can let exactly one run."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.lags: list[float] = []

    def __call__(self) -> float:
        return self.now

    def ticked(self, lag_s: float) -> None:
        self.lags.append(lag_s)

    async def next_tick(self) -> float:
        """Let the event loop run until the sampler ticks once; the lateness it measured.

        A condition wait: the 30 s only bounds a sampler that never ticks (a hang), and
        how fast the box runs changes nothing the test asserts."""
        seen = len(self.lags)

        async def ticked() -> None:
            while len(self.lags) == seen:
                await asyncio.sleep(0.001)

        await asyncio.wait_for(ticked(), timeout=30.0)
        return self.lags[-1]

    async def elapse(self, seconds: float) -> None:
        """``seconds`` pass with the event loop free: the sampler ticks on time."""
        for _ in range(round(seconds / _TICK_S)):
            self.now += _TICK_S
            assert await self.next_tick() == 0.0


def parsed(svc: DecideService, raw: bytes) -> AdRequest:
    req = svc.parse(raw)
    assert isinstance(req, AdRequest)
    return req


def test_requests_arriving_together_share_one_scoring_run() -> None:
    rec = Recorder()

    async def main() -> list[dict[str, Any]]:
        svc = service(rec)
        calls = [svc.submit(parsed(svc, body(i)), 0, 1000 + i) for i in range(5)]
        return await asyncio.gather(*calls)

    got = asyncio.run(main())
    assert rec.runs == [[f"r{i}" for i in range(5)]]
    assert [d["request_id"] for d in got] == [f"r{i}" for i in range(5)]
    assert [d["start"] for d in got] == [1000 + i for i in range(5)]  # each its own budget


def test_a_run_that_reaches_the_row_limit_goes_at_once() -> None:
    rec = Recorder()

    async def main() -> None:
        svc = service(rec, scorer_max_batch_rows=4, scorer_max_wait_ms=10_000.0)
        cands = {"candidates": ["a", "b"]}
        await asyncio.wait_for(
            asyncio.gather(*(svc.submit(parsed(svc, body(i, **cands)), 0, 0) for i in range(4))),
            timeout=5,  # the 10 s wait would otherwise hold them
        )

    asyncio.run(main())
    assert [len(r) for r in rec.runs] == [2, 2]


def test_a_request_is_shed_while_the_event_loop_runs_late() -> None:
    clock = Clock()

    async def main() -> tuple[bool, bool, float, bool]:
        svc = service(Recorder(), clock=clock, decide_max_queue_ms=20.0)
        idle = svc.overloaded()  # starts the lateness sampling
        await clock.elapse(0.01)
        clock.now += 0.05  # the loop is blocked 50 ms (an ingest batch, a GC pause)
        busy = svc.overloaded()
        measured = await clock.next_tick()  # the first tick after the block sees it
        await clock.elapse(0.01)  # the loop catches up
        return idle, busy, measured, svc.overloaded()

    idle, busy, measured, after = asyncio.run(main())
    assert not idle
    assert busy
    assert measured == pytest.approx(0.05 - _TICK_S)  # late by the block, less its tick
    assert not after


def test_lateness_sampling_stops_when_requests_stop_and_the_next_request_restarts_it() -> None:
    clock = Clock()

    async def main() -> tuple[bool, bool, float, bool, bool, int]:
        svc = service(Recorder(), clock=clock, decide_max_queue_ms=20.0)
        svc.overloaded()
        await clock.elapse(0.01)
        running = svc.sampling
        clock.now += _TICK_IDLE_S + 0.01  # no request checked for longer than the idle limit
        await clock.next_tick()  # this tick finds nobody asked: it schedules no other
        stopped, lag_after_stop = not svc.sampling, svc.lag_s
        seen = len(clock.lags)
        shed = svc.overloaded()  # the next request: not shed for lateness from before the stop
        await clock.elapse(0.01)  # sampled again, on time
        return running, stopped, lag_after_stop, shed, svc.sampling, len(clock.lags) - seen

    running, stopped, lag_after_stop, shed, restarted, resumed = asyncio.run(main())
    assert running and stopped and restarted
    assert lag_after_stop == 0.0
    assert not shed
    assert resumed == round(0.01 / _TICK_S)


def test_a_loop_late_by_less_than_the_limit_sheds_nothing() -> None:
    clock = Clock()

    async def main() -> bool:
        svc = service(Recorder(), clock=clock, decide_max_queue_ms=20.0)
        svc.overloaded()
        await clock.elapse(0.01)
        clock.now += 0.015  # blocked 15 ms: late, but within the 20 ms limit
        return svc.overloaded()

    assert not asyncio.run(main())


def test_a_request_is_shed_while_the_oldest_queued_one_is_older_than_the_limit() -> None:
    clock = Clock()

    async def main() -> tuple[bool, bool, bool]:
        # Held by the micro-batch wait (an hour, so it cannot flush during the test).
        rec = Recorder()
        svc = service(rec, clock=clock, decide_max_queue_ms=20.0, scorer_max_wait_ms=3.6e6)
        waiting = asyncio.ensure_future(svc.submit(parsed(svc, body(0)), 0, 0))
        await asyncio.sleep(0)  # queued
        svc.overloaded()  # the lateness sampler starts at the first question
        await clock.elapse(0.01)
        young = svc.overloaded()  # queued 10 ms
        await clock.elapse(0.02)  # the loop is free all along: only the queue is old
        old = svc.overloaded()  # queued 30 ms
        queued = bool(svc.queue) and not rec.runs
        waiting.cancel()
        return young, old, queued

    young, old, queued = asyncio.run(main())
    assert not young
    assert old
    assert queued


def test_a_malformed_body_is_a_400_with_the_contract_error_in_one_line() -> None:
    svc = service(Recorder())
    for raw in (b"{nope", body(1, placement="Bad Placement"), body(1, tmax_ms=0), b"[]"):
        reply = svc.parse(raw)
        assert isinstance(reply, Reply)
        assert reply.status == 400
        message = msgspec.json.decode(reply.body)["error"]
        assert message.startswith("ad-requests contract: ")
        assert "\n" not in message


def test_the_service_says_whether_it_was_asked_lately() -> None:
    clock = Clock()
    svc = service(Recorder(), clock=clock)
    assert not svc.asked_within(60.0)
    svc.asked()
    clock.now += 59.0
    assert svc.asked_within(60.0)
    clock.now += 2.0
    assert not svc.asked_within(60.0)


def test_a_decision_the_broker_refuses_is_counted() -> None:
    rec, failures = Recorder(), list[BaseException]()

    async def main() -> None:
        svc = service(rec, failures)
        await svc.submit(parsed(svc, body(0)), 0, 0)
        rec.sends[0].set_exception(OSError("broker gone"))
        await asyncio.sleep(0)

    asyncio.run(main())
    assert len(failures) == 1


def test_every_caller_of_a_failed_run_gets_the_error() -> None:
    rec = Recorder(fail=True)

    async def main() -> list[Any]:
        svc = service(rec)
        calls = [svc.submit(parsed(svc, body(i)), 0, 0) for i in range(3)]
        return await asyncio.gather(*calls, return_exceptions=True)

    got = asyncio.run(main())
    assert [type(e) for e in got] == [RuntimeError] * 3


@pytest.mark.parametrize("tmax", [None, 50])
def test_a_request_past_its_budget_gets_a_deadline_no_fill_unscored(tmax: int | None) -> None:
    s = settings(freq_cap_per_day=100)
    st = stage(s)
    now = DAY0 + 1000
    old = requests(2, now, "old")
    for i, raw in enumerate(old):  # budget started 60 ms ago
        req = json.loads(raw.value or b"")
        if tmax is not None:
            req["tmax_ms"] = tmax
        old[i] = Raw(json.dumps(req).encode(), raw.key, raw.partition, raw.offset, now - 60)
    fresh = requests(1, now, "fresh")
    default = 0 if tmax is not None else 50
    empty = StateReaders(Tables().load, Tables().load, Tables().load)
    out = st.process([*old, *fresh], empty, now, default)
    by_id = {d.request_id: msgspec.to_builtins(d) for _, _, d in out.decisions}
    assert len(by_id) == 3
    for i in range(2):
        d = by_id[f"old-{i}"]
        assert d["ad_id"] is None
        assert d["no_fill_reason"] == "deadline"
    assert by_id["fresh-0"]["ad_id"] is not None
    assert "no_fill_reason" not in by_id["fresh-0"]
    assert out.no_fill == {"deadline": 2}
    assert out.rows_scored == 2  # only the fresh request's candidates


def test_a_shed_topic_request_gets_a_shed_no_fill_unscored() -> None:
    """The ad-requests topic's answer while decisions give way to ingest: every request
    answered, none scored, no table read; one past its budget is still a deadline."""
    st = stage(settings())
    now = DAY0 + 1000
    late = [Raw(r.value, r.key, r.partition, r.offset, now - 60) for r in requests(1, now, "l")]
    good, rejected = st.split_topic([*late, *requests(2, now, "s")])
    assert not rejected
    out = st.shed(good, now, 50)
    by_id = {d.request_id: msgspec.to_builtins(d) for _, _, d in out.decisions}
    assert set(by_id) == {"l-0", "s-0", "s-1"}
    assert by_id["l-0"]["no_fill_reason"] == "deadline"
    for rid in ("s-0", "s-1"):
        d = by_id[rid]
        assert (d["ad_id"], d["no_fill_reason"], d["model_version"]) == (None, "shed", "none")
        assert (d["candidates"], d["propensity"]) == (0, 1.0)
    assert out.no_fill == {"shed": 2, "deadline": 1}
    assert out.rows_scored == 0 and not out.cap_writes and not out.spend_writes


def test_no_budget_means_no_deadline() -> None:
    st = stage(settings())
    now = DAY0 + 10_000_000
    old = [Raw(r.value, r.key, r.partition, r.offset, 0) for r in requests(2, now, "q")]
    empty = StateReaders(Tables().load, Tables().load, Tables().load)
    out = st.process(old, empty, now)
    assert all(d.ad_id is not None for _, _, d in out.decisions)


@pytest.mark.parametrize("cap", [1, 2])
def test_a_users_requests_in_one_run_and_the_next_never_pass_a_frequency_cap(cap: int) -> None:
    """The caps a request's decision uses up hold for the user's next request in the same
    micro-batch and in later ones (the decision skips the ad-id lookup while nothing is
    capped, so both the batch's recheck and the stored record must still apply the rule)."""
    s = settings(freq_cap_per_day=cap, pacing=False)
    st, caps_table = stage(s), Tables()
    now = DAY0 + 1000

    def run(tag: str, n: int) -> list[str | None]:
        raws = []
        for i in range(n):
            req = {"request_id": f"{tag}-{i}", "user_id": "u", "placement": "home", "ts": now}
            raws.append(Raw(json.dumps(req).encode(), b"u", 0, i, now))
        tables = StateReaders(Tables().load, caps_table.load, Tables().load)
        out = st.process(raws, tables, now)
        caps_table.write(out.cap_writes)
        return [msgspec.to_builtins(d)["ad_id"] for _, _, d in out.decisions]

    first = run("a", 3)  # two ads in the catalog: each may be shown ``cap`` times a day
    later = run("b", 2 * cap)
    served = [a for a in first + later if a is not None]
    assert sorted(served) == sorted(["tight-ad", "filler-ad"] * cap)
    assert first[0] == "tight-ad"  # greedy: the higher bid first
    assert first.count(None) + later.count(None) == 3  # the rest: no fills


def test_requests_that_come_while_a_run_is_decided_wait_and_share_the_next_run() -> None:
    """A ``decide`` whose model runs on a thread returns an awaitable; while it is out,
    the event loop takes more requests: they queue, and go in one run once it is done,
    never in a second run alongside it (two runs at once could both spend a cap)."""
    gate_open = asyncio.Event()
    runs: list[list[str]] = []
    running, most = 0, 0

    async def decide(reqs: Sequence[tuple[AdRequest, Raw]]) -> tuple[list[dict[str, Any]], Any]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        runs.append([r.request_id for r, _ in reqs])
        if len(runs) == 1:
            await gate_open.wait()  # the first run's model is still on the thread
        running -= 1

        async def send() -> list[Any]:
            return []

        return [{"request_id": r.request_id} for r, _ in reqs], send

    async def main() -> list[dict[str, Any]]:
        svc = DecideService(Settings(), decide, lambda: 10, lambda _e: None)
        first = asyncio.ensure_future(svc.submit(parsed(svc, body(0)), 0, 0))
        for _ in range(100):  # the first run starts within a few loop turns
            if runs:
                break
            await asyncio.sleep(0)
        assert runs == [["r0"]], "the first run did not start"
        later = [asyncio.ensure_future(svc.submit(parsed(svc, body(i)), 0, 0)) for i in (1, 2, 3)]
        for _ in range(10):  # the loop is free: nothing else may start meanwhile
            await asyncio.sleep(0)
        assert runs == [["r0"]]
        gate_open.set()
        return await asyncio.wait_for(asyncio.gather(first, *later), timeout=30)

    got = asyncio.run(main())
    assert runs == [["r0"], ["r1", "r2", "r3"]]
    assert most == 1
    assert [d["request_id"] for d in got] == ["r0", "r1", "r2", "r3"]


def test_a_request_that_finds_no_partition_map_makes_the_worker_learn_it_again() -> None:
    """A worker whose start left no ad-requests partitions in its metadata answered 503
    for good; now each such request kicks one relearn, one at a time, at most one a
    second, and a failed try is retried by a later request."""
    from streams.serve import Relearn

    now = [0.0]
    calls: list[float] = []
    fail = [True]
    gate = asyncio.Event()

    async def learn() -> None:
        calls.append(now[0])
        await gate.wait()
        if fail[0]:
            raise RuntimeError("no metadata")

    async def scenario() -> None:
        r = Relearn(learn, every_s=1.0, clock=lambda: now[0])
        first = r.kick()
        assert first is not None
        assert r.kick() is None  # one try at a time
        await asyncio.sleep(0)
        assert calls == [0.0]
        gate.set()
        await first  # the try fails: logged, not raised
        now[0] = 0.5
        assert r.kick() is None  # within the second: no new try
        assert calls == [0.0]
        now[0], fail[0] = 1.2, False
        second = r.kick()
        assert second is not None
        await second
        assert calls == [0.0, 1.2] and r.tries == 2

    asyncio.run(scenario())


# -- decisions give way to ingest (IngestGuard) ------------------------------------------------
def offered(guard: IngestGuard, clock: Clock, seconds: float, rate: float, cost_s: float,
            lag_s: float | None) -> list[bool]:
    """Requests at ``rate``/s for ``seconds``, each admitted one holding the loop
    ``cost_s``; ingest says ``lag_s`` every 10 ms (None: it says nothing). Which were
    admitted, in order."""
    admitted: list[bool] = []
    step, told = 1.0 / rate, 0.0
    for _ in range(round(seconds * rate)):
        clock.now += step
        told += step
        if lag_s is not None and told >= 0.01:
            guard.saw(lag_s)
            told = 0.0
        ok = guard.admit()
        if ok:
            guard.busy(cost_s)
        admitted.append(ok)
    return admitted  # fmt: skip


def test_decisions_give_way_while_ingest_is_behind() -> None:
    """1,000 requests/s at 0.8 ms each hold 80% of the loop. With ingest 500 ms behind
    (limit 200 ms) the cap halves every 100 ms to a tenth, so after a second about a
    tenth of the loop is theirs: 0.1 / 0.8 ms = 125 requests/s admitted."""
    clock = Clock()
    guard = IngestGuard(200.0, clock)
    first = offered(guard, clock, 1.0, 1000, 0.0008, lag_s=None)
    assert all(first)  # ingest keeps up: nothing shed, whatever the load
    assert guard.load == pytest.approx(0.8, rel=0.05)
    behind = offered(guard, clock, 2.0, 1000, 0.0008, lag_s=0.5)
    assert guard.cap == IngestGuard.FLOOR
    assert 100 <= sum(behind[1000:]) <= 150  # the second second: ~125 admitted
    assert sum(behind[:100]) > sum(behind[1000:1100])  # it gives way step by step


def test_a_few_requests_are_never_shed_for_a_lag_they_did_not_cause() -> None:
    clock = Clock()
    guard = IngestGuard(200.0, clock)
    assert all(offered(guard, clock, 10.0, 5, 0.001, lag_s=3.0))  # 0.5% of the loop
    assert guard.cap == IngestGuard.FLOOR


def test_the_cap_climbs_back_once_ingest_keeps_up_or_goes_quiet() -> None:
    for recovered in (0.05, None):  # ingest back within the limit; ingest says nothing
        clock = Clock()
        guard = IngestGuard(200.0, clock)
        offered(guard, clock, 1.0, 1000, 0.0008, lag_s=0.5)
        assert guard.cap == IngestGuard.FLOOR and guard.behind()
        after = offered(guard, clock, 2.0, 1000, 0.0008, lag_s=recovered)
        assert not guard.behind() and guard.cap == 1.0
        assert all(after[-500:])  # the last half second: every request


def test_no_limit_never_sheds() -> None:
    clock = Clock()
    guard = IngestGuard(0.0, clock)
    assert all(offered(guard, clock, 1.0, 1000, 0.005, lag_s=60.0))


def test_the_owner_map_names_each_partition_of_the_topic_once_and_says_when_it_is_whole() -> None:
    a, b = "http://10.0.0.1:6066", "http://10.0.0.2:6066"
    whole = {a: {"t.ad-requests": [0, 2], "t.user-events": [0, 2]},
             b: {"t.ad-requests": [3, 1], "t.user-events": [1, 3]}}  # fmt: skip
    got = owner_map(whole, "t.ad-requests", 4)
    assert got == {"topic": "t.ad-requests", "partitions": 4, "partitioner": "murmur2",
                   "owners": {"0": a, "1": b, "2": a, "3": b}, "complete": True}  # fmt: skip
    assert list(got["owners"]) == ["0", "1", "2", "3"]  # in partition order

    moving = {a: {"t.ad-requests": [0, 2]}, b: {"t.user-events": [1, 3]}}  # 1 and 3 unowned
    got = owner_map(moving, "t.ad-requests", 4)
    assert got["owners"] == {"0": a, "2": a}
    assert got["complete"] is False

    stale = {a: {"t.ad-requests": [0, 1, 7]}}  # 7: from a larger count than the topic's now
    assert owner_map(stale, "t.ad-requests", 2)["owners"] == {"0": a, "1": a}
    assert owner_map({}, "t.ad-requests", 2)["complete"] is False


# Apache Kafka's UtilsTest.testMurmur2 (the Java client's hash, signed 32-bit).
JAVA_MURMUR2 = {"21": -973932308, "foobar": -790332482, "a-little-bit-long-string": -985981536,
                "a-little-bit-longer-string": -1486304829, "abc": 479470107,
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}  # fmt: skip


@pytest.mark.parametrize("partitions", [1, 4, 12, 50])
def test_a_users_partition_is_the_java_clients_for_the_same_key(partitions: int) -> None:
    for key, java in JAVA_MURMUR2.items():
        assert user_partition(key, partitions) == (java & 0x7FFFFFFF) % partitions, key
