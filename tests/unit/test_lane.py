"""The decision lane (streams/lane.py): batches one at a time, model runs on a thread.

The real decision stage with the shipped model and dict-backed tables
(tests/unit/test_pacing_stage.py), on a real event loop and a real scoring thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pytest

from schemas.messages import AdRequest
from scoring.registry import LoadedModel
from streams.deadletter import Raw
from streams.decide import DecideResult, DecideStage, Prepared, Scored, ServingModels, StateReaders
from streams.lane import DecisionLane
from tests.unit.test_pacing_stage import DAY0, Tables, models, settings, stage

__all__ = ["models"]  # the shipped model, loaded once (a fixture of test_pacing_stage)
NOW = DAY0 + 1000


def decoded(st: DecideStage, rids: Sequence[str], user: str = "u") -> list[tuple[AdRequest, Raw]]:
    raws = []
    for i, rid in enumerate(rids):
        req = {"request_id": rid, "user_id": user, "placement": "home", "ts": NOW}
        raws.append(Raw(json.dumps(req).encode(), user.encode(), 0, i, NOW))
    good, rejected = st.split_topic(raws)
    assert not rejected
    return good


def ads(out: DecideResult) -> list[str | None]:
    return [msgspec.to_builtins(d)["ad_id"] for _, _, d in out.decisions]


def serving(models: ServingModels) -> ServingModels:
    """A copy per test: a test that swaps its model leaves the module's fixture alone."""
    return dataclasses.replace(models)


def test_a_batch_that_comes_while_one_scores_on_the_thread_sees_its_caps(
    models: ServingModels,
) -> None:
    """Two batches of one user's requests at once (the topic's and /decide's): the
    second waits for the first's writes, so with a cap of one a day each ad is shown
    once, never twice. Without the lock both read the empty caps while the first one's
    model runs on the thread, and both show the higher bid."""
    st, caps_table = stage(settings(freq_cap_per_day=1, pacing=False), serving(models)), Tables()
    lane = DecisionLane(st, thread=True, clock=lambda: NOW)
    threads: list[tuple[str, bool]] = []
    score = st.score

    def scored_where(batch: Prepared) -> Scored:  # the real run, and the thread it ran on
        threads.append((threading.current_thread().name, batch.runs_model))
        return score(batch)

    st.score = scored_where  # type: ignore[method-assign]

    async def batch(tag: str) -> list[str | None]:
        tables = StateReaders(Tables().load, caps_table.load, Tables().load)
        write = lambda r: caps_table.write(r.cap_writes)  # noqa: E731
        out, _ = await lane.decide(decoded(st, [tag]), tables, 0, write)
        return ads(out)

    async def main() -> list[list[str | None]]:
        return list(await asyncio.gather(batch("a"), batch("b"), batch("c")))

    got = asyncio.run(main())
    lane.close()
    assert sorted(a for run in got for a in run if a is not None) == ["filler-ad", "tight-ad"]
    assert got[0] == ["tight-ad"]  # greedy: the higher bid first
    assert [a for run in got for a in run].count(None) == 1  # the third: both capped
    # Every model run left the event loop's thread; the third batch had nothing to score.
    assert threads == [("adpulse-scorer_0", True)] * 2 + [("MainThread", False)]


def test_the_thread_changes_no_decision(models: ServingModels) -> None:
    """The same requests decided inline and through the thread rank alike."""

    def run(thread: bool) -> list[dict[str, object]]:
        st = stage(settings(freq_cap_per_day=100, pacing=False), serving(models))
        lane = DecisionLane(st, thread=thread, clock=lambda: NOW)
        tables = StateReaders(Tables().load, Tables().load, Tables().load)
        reqs = decoded(st, [f"r{i}" for i in range(4)])
        out, _ = asyncio.run(lane.decide(reqs, tables, 0, lambda _r: None))
        lane.close()
        keep = ("ad_id", "pctr", "pctr_raw", "model_version", "policy", "candidates")
        return [{k: msgspec.to_builtins(d).get(k) for k in keep} for _, _, d in out.decisions]

    inline, threaded = run(False), run(True)
    assert inline == threaded
    assert all(d["model_version"] not in ("none", "") for d in inline)


def test_a_model_swapped_while_a_batch_runs_leaves_the_batch_its_model(
    models: ServingModels,
) -> None:
    current = models.current
    assert current is not None
    st = stage(settings(freq_cap_per_day=100, pacing=False), serving(models))
    tables = StateReaders(Tables().load, Tables().load, Tables().load)
    batch = st.begin(decoded(st, ["s0", "s1"]), tables, NOW)
    newer = dataclasses.replace(current, version=current.version + "-newer")
    st.models.swap(newer, 0.02)  # the registry poller, between the batch's start and its run
    out = st.finish(batch, st.score(batch))
    assert {d.model_version for _, _, d in out.decisions} == {current.version}
    assert out.fallbacks == 0


def test_a_model_that_fails_on_the_thread_falls_back_as_inline(models: ServingModels) -> None:
    current = models.current
    assert current is not None
    # A spec the graph does not take: the run raises in ONNX Runtime (or in assembly).
    broken: LoadedModel = dataclasses.replace(
        current, spec=dataclasses.replace(current.spec, dim=current.spec.dim + 3)
    )
    st = stage(settings(freq_cap_per_day=100, pacing=False),
               ServingModels(broken, broken.fallback(0.02), None))  # type: ignore[arg-type]  # fmt: skip
    lane = DecisionLane(st, thread=True, clock=lambda: NOW)
    tables = StateReaders(Tables().load, Tables().load, Tables().load)
    out, _ = asyncio.run(lane.decide(decoded(st, ["f0", "f1"]), tables, 0, lambda _r: None))
    lane.close()
    assert out.fallbacks == 2
    assert all(d.ad_id is not None for _, _, d in out.decisions)
    assert {d.policy for _, _, d in out.decisions} == {st.models.fallback.policy}


@pytest.mark.parametrize("thread", [True, False])
def test_a_forget_or_a_click_charge_waits_for_the_batch_in_flight(
    models: ServingModels, thread: bool
) -> None:
    """The lane's lock is what the other writers of caps and spend hold: one taken while
    a batch is on the thread is granted only after that batch's writes."""
    st, caps_table = stage(settings(freq_cap_per_day=1, pacing=False), serving(models)), Tables()
    lane = DecisionLane(st, thread=thread, clock=lambda: NOW)
    order: list[str] = []

    async def batch() -> None:
        tables = StateReaders(Tables().load, caps_table.load, Tables().load)
        await lane.decide(decoded(st, ["w0"]), tables, 0, lambda _r: order.append("written"))

    async def other_writer() -> None:
        async with lane.lock:
            order.append("forget")

    async def main() -> None:
        await asyncio.gather(batch(), other_writer())

    asyncio.run(main())
    lane.close()
    assert order == ["written", "forget"]


def test_the_lane_reports_the_loop_time_of_each_batch_without_its_thread_time(
    models: ServingModels,
) -> None:
    """What ``POST /decide`` gives way to ingest by (streams/serve.py, IngestGuard): the
    batch's steps on the loop, not its model run on the thread, while which the loop is
    free. The lane's timer is the test's: each step moves it by a known amount (begin 2 s,
    the run on the thread 30 s, finish 5 s, the writes 1 s), so what the lane reports is
    exact and no clock is read."""
    st = stage(settings(freq_cap_per_day=100, pacing=False), serving(models))
    now = [100.0]
    held: list[float] = []
    lane = DecisionLane(st, thread=True, clock=lambda: NOW, busy=held.append,
                        timer=lambda: now[0])  # fmt: skip
    begin, score, finish = st.begin, st.score, st.finish
    ran_on: list[str] = []

    def moving(step: Callable[..., Any], seconds: float) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            out = step(*args)
            ran_on.append(threading.current_thread().name)
            now[0] += seconds
            return out

        return run

    st.begin = moving(begin, 2.0)  # type: ignore[method-assign]
    st.score = moving(score, 30.0)  # type: ignore[method-assign]
    st.finish = moving(finish, 5.0)  # type: ignore[method-assign]

    def write(_r: Any) -> None:
        now[0] += 1.0

    tables = StateReaders(Tables().load, Tables().load, Tables().load)
    asyncio.run(lane.decide(decoded(st, ["b0", "b1"]), tables, 0, write))
    lane.close()
    assert ran_on[1].startswith("adpulse-scorer")  # the run was on the thread
    assert held == [8.0]  # begin + finish + writes; the thread's 30 s are not the loop's
