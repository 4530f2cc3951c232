"""The click join end to end: real broker, real worker, decisions and clicks in, labels out.

Decisions are produced straight to ad-decisions (the test plays the decide
stage) with a 2 s attribution window and a 1 s idle watermark, so every window
closes within seconds.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from schemas import first_error
from streams.runtime.topicadmin import create_topics

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def short_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADPULSE_ATTRIBUTION_WINDOW_S", "2")
    monkeypatch.setenv("ADPULSE_WATERMARK_IDLE_S", "1")


class Feedback:
    """ctr-feedback records by decision_id (lists, so duplicates show)."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
        )
        topic = settings.topic("ctr-feedback")
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # bench-ok: a wait bound
            for batch in self.consumer.poll(timeout_ms=100).values():
                for r in batch:
                    rec = json.loads(r.value)
                    assert r.key == rec["ad_id"].encode()
                    self.by_id[rec["decision_id"]].append(rec)

    def wait(self, ids: list[str], timeout: float) -> None:
        end = time.monotonic() + timeout
        while any(i not in self.by_id for i in ids):
            late = time.monotonic() >= end  # bench-ok: a wait bound, not a speed claim
            assert not late, f"no label for {[i for i in ids if i not in self.by_id]}"
            self.poll(0.2)


def interest(i: int) -> list[float]:
    """The snapshot a decision carries: 4-decimal numbers (the join keeps them as float16)."""
    return [0.0, 0.25, round(0.1 * (i % 7), 4), 1.5]


class Feed:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=2, acks=1)

    def decisions(self, ids: list[str], ts: int) -> None:
        for i, did in enumerate(ids):
            d = {"request_id": did, "user_id": f"u{i % 7}", "ad_id": f"ad{i % 3}", "score": 0.1,
                 "pctr": 0.05, "bid": 2.0, "propensity": 0.9, "policy": "greedy",
                 "model_version": "v1", "ts": ts, "latency_ms": 1.0,
                 "placement": "home", "pctr_raw": 0.08,
                 "features": {"interest": interest(i), "placement": "home", "pctr": 0.08,
                              "category_id": 2, "campaign_id": "c1"}}  # fmt: skip
            self._send("ad-decisions", d["user_id"], d)
        self.producer.flush()

    def clicks(self, ids: list[str], all_ids: list[str], ts: int, tag: str) -> None:
        for did in ids:
            i = all_ids.index(did)
            e = {"event_id": f"{tag}-{did}", "user_id": f"u{i % 7}", "kind": "click",
                 "item_id": 1, "category_id": 2, "ts": ts, "ad_id": f"ad{i % 3}",
                 "decision_id": did}  # fmt: skip
            self._send("user-events", e["user_id"], e)
        self.producer.flush()

    def _send(self, topic: str, key: str, value: dict[str, Any]) -> None:
        self.producer.send(self.s.topic(topic), key=key.encode(), value=json.dumps(value).encode())


def late_clicks(worker: WorkerProcess) -> float:
    return worker.metric("adpulse_late_clicks_total")


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    create_topics(settings)
    w = WorkerProcess(settings, tmp_path)
    yield w.start()
    w.stop()


def test_each_decision_gets_one_label_clicks_one_late_clicks_counted_not_emitted(
    worker: WorkerProcess, settings: Settings
) -> None:
    ids = [f"d{i}" for i in range(40)]
    feed, fb = Feed(settings), Feedback(settings)
    now = int(time.time() * 1000)
    feed.decisions(ids, now)
    time.sleep(0.3)  # a person's click: one at the broker sooner than 150 ms is too_fast
    feed.clicks(ids[:20], ids, now + 500, "c")
    fb.wait(ids, timeout=30)
    assert all(first_error("ctr-feedback", r[0]) is None for r in fb.by_id.values())
    assert {i: fb.by_id[i][0]["clicked"] for i in ids} == {i: int(i in ids[:20]) for i in ids}
    # Each label carries its decision's snapshot: the interest vector (float16 precision)
    # and the raw model output as features.pctr, the served one at the top level.
    for n, i in enumerate(ids):
        features = fb.by_id[i][0]["features"]
        assert features["interest"] == pytest.approx(interest(n), abs=1e-3)
        assert features["pctr"] == 0.08 and fb.by_id[i][0]["pctr"] == 0.05
        assert features["category_id"] == 2
    # A burst of clicks after the zero labels (and repeats of the counted ones): no new labels.
    feed.clicks(ids[20:], ids, now + 1500, "late")
    feed.clicks(ids[:20], ids, now + 1600, "again")
    worker.wait_until(lambda: late_clicks(worker) == 20, 20, "20 late clicks counted")
    fb.poll(2.0)
    assert {i: len(fb.by_id[i]) for i in ids} == dict.fromkeys(ids, 1)


@pytest.mark.long  # ~17 s, a kill
def test_worker_killed_during_the_window_labels_each_decision_once_after_restart(
    settings: Settings, tmp_path: Path
) -> None:
    create_topics(settings)
    worker = WorkerProcess(settings, tmp_path).start()
    ids = [f"k{i}" for i in range(60)]
    feed, fb = Feed(settings), Feedback(settings)
    now = int(time.time() * 1000)
    feed.decisions(ids, now)
    time.sleep(0.3)  # a person's click: one at the broker sooner than 150 ms is too_fast
    feed.clicks(ids[:30:2], ids, now + 300, "c")
    time.sleep(0.5)
    worker.kill()
    again = WorkerProcess(settings, tmp_path, name="restarted").start()
    try:
        fb.wait(ids, timeout=40)
        fb.poll(2.0)
    finally:
        again.stop()
    assert {i: len(fb.by_id[i]) for i in ids} == dict.fromkeys(ids, 1)
    assert {i: fb.by_id[i][0]["clicked"] for i in ids} == {i: int(i in ids[:30:2]) for i in ids}


@pytest.mark.long  # ~19 s, a restart
def test_worker_down_longer_than_window_and_idle_labels_exactly_after_restart(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decisions and their clicks wait on the topics while the worker is down for longer
    than window + grace + idle (2 s + 1 s + 1 s). The restarted worker reads both topics'
    backlogs in an order nobody controls: its watermark must advance by their event times
    (the lower of the two), not by the wall clock. Before the fix, a decision read before
    its click was labelled 0 at once, and a click read before its decision was expired as
    a click with no impression (grace 1 s), so either way clicks inside the window were
    lost. Now every decision is labelled exactly once, clicked=1 iff a click inside its
    window was sent."""
    monkeypatch.setenv("ADPULSE_FEEDBACK_GRACE_S", "1")
    # 200 events of each user at once: a backfill the live rate limit would refuse.
    monkeypatch.setenv("ADPULSE_MAX_EVENTS_PER_USER_S", "0")
    create_topics(settings)
    WorkerProcess(settings, tmp_path).start().stop()  # the group has committed: it is "down"
    ids = [f"w{i}" for i in range(60)]
    inside, outside = ids[:20], ids[20:30]  # clicked in the window; clicked before the decision
    feed, fb = Feed(settings), Feedback(settings)
    now = int(time.time() * 1000)
    for n in range(200):  # older browsing ahead of the clicks on user-events
        for u in range(7):
            e = {"event_id": f"f{u}-{n}", "user_id": f"u{u}", "kind": "browse",
                 "item_id": n % 50, "category_id": n % 9, "ts": now - 60_000 + n}  # fmt: skip
            feed._send("user-events", e["user_id"], e)
    feed.decisions(ids, now)
    time.sleep(0.3)  # a person's click: one at the broker sooner than 150 ms is too_fast
    feed.clicks(inside, ids, now + 500, "c")
    feed.clicks(outside, ids, now - 500, "early")
    down_ms = 2_000 + 1_000 + 1_000 + 2_000  # window + grace + idle, and a margin
    while time.time() * 1000 < now + down_ms:  # bench-ok: the downtime, not a speed claim
        time.sleep(0.2)
    again = WorkerProcess(settings, tmp_path, name="restarted").start()
    try:
        fb.wait(ids, timeout=60)
        fb.poll(2.0)
    finally:
        again.stop()
    assert {i: len(fb.by_id[i]) for i in ids} == dict.fromkeys(ids, 1)
    assert {i: fb.by_id[i][0]["clicked"] for i in ids} == {i: int(i in inside) for i in ids}
