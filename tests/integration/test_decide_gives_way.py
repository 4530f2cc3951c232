"""POST /decide gives way to ingest that falls behind (streams/serve.py, ``IngestGuard``),
in a real worker on the real broker: the lag ingest reports, the load the decision lane
reports and the shedding in front of the decisions, wired together.

The worker's lag limit is 1 ms, so any event it writes counts as behind (an event is
older than that by the time it is fetched), and its queue limit is an hour, so every
503 is the guard's. How fast the box is changes which requests are shed, not whether
some are: a saturated loop only makes the decisions' load larger.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from adpulse.broker import EmbeddedBroker
from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from streams.runtime.topicadmin import create_topics
from tests.conftest import isolated
from tests.integration.test_decisions import Decisions, ad, request

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes
CATS = [4756105, 982926, 2355072, 1320293, 4145813]
GUARDED = {
    "ADPULSE_DECIDE_MAX_INGEST_LAG_MS": "1",  # every event is behind: the guard acts
    "ADPULSE_DECIDE_MAX_QUEUE_MS": "3600000",  # no shedding by queue: each 503 is the guard's
    "ADPULSE_POLICY": "greedy",
}
CALLERS, MOST_PER_CALLER = 8, 1500  # the count only bounds a run that never sheds (a hang)
BURST = 2_000  # ad-requests records sent at once, as a backlog


def events(producer: KafkaProducer, settings: Settings, unique: str, stop: threading.Event) -> None:
    """Ingest, about 4,000 events/s, until ``stop``."""
    i = 0
    while not stop.is_set():
        user = f"{unique}-u{i % 50}"
        event = {"event_id": f"{unique}-e{i}", "user_id": user, "kind": "browse",
                 "item_id": 1000 + i % 97, "category_id": CATS[i % 5],
                 "ts": int(time.time() * 1000)}  # fmt: skip
        producer.send(settings.topic("user-events"), key=user.encode(),
                      value=json.dumps(event).encode())  # fmt: skip
        i += 1
        if i % 20 == 0:
            time.sleep(0.005)


def guarded_worker(
    broker: EmbeddedBroker, tmp_path: Path, unique: str
) -> tuple[Settings, WorkerProcess, int]:
    """A worker with :data:`GUARDED` and a catalog of ten ads; returns it and the ad count."""
    settings = isolated(broker, unique, tmp_path / "w")
    create_topics(settings)
    ads = [ad(f"g-{i}", "guard", round(1.0 + 0.05 * i, 2), CATS[i % 5]) for i in range(10)]
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    worker = WorkerProcess(settings, tmp_path, name="g", extra_env=GUARDED).start()
    return settings, worker, len(ads)


def test_requests_give_way_to_ingest_that_is_behind_and_nothing_else_is_lost(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    unique = f"guard-{uuid.uuid4().hex[:8]}"
    settings, worker, n_ads = guarded_worker(broker, tmp_path, unique)
    decisions = Decisions(settings)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=5, acks=1)
    results: list[tuple[str, int, Any, dict[str, str]]] = []
    lock = threading.Lock()
    shed_seen, stop = threading.Event(), threading.Event()
    try:
        worker.wait_until(lambda: worker.metric("adpulse_catalog_ads") == n_ads, 30, "catalog")

        def fire(t: int) -> None:
            for i in range(MOST_PER_CALLER):
                if shed_seen.is_set() and i >= 50:
                    return
                rid = f"{unique}-r{t}-{i}"
                raw = json.dumps(request(rid, f"{unique}-u{(t * 7 + i) % 50}", "guard")).encode()
                status, got, headers = worker.post("/decide", raw)
                with lock:
                    results.append((rid, status, got, headers))
                if status == 503:
                    shed_seen.set()

        ingest = threading.Thread(target=events, args=(producer, settings, unique, stop))
        ingest.start()
        callers = [threading.Thread(target=fire, args=(t,)) for t in range(CALLERS)]
        for c in callers:
            c.start()
        for c in callers:
            c.join()
        stop.set()
        ingest.join()

        statuses = {s for _, s, _, _ in results}
        assert statuses <= {200, 503}, statuses
        shed = [(got, h) for _, s, got, h in results if s == 503]
        assert shed, f"{len(results)} requests next to ingest 1 ms behind, none shed"
        assert all(got["error"] == "ingest is behind: request shed" for got, _ in shed)
        assert all(h.get("Retry-After") == "1" for _, h in shed)
        counted = worker.metric("adpulse_decide_requests_total", 'outcome="shed_ingest"')
        assert counted == len(shed)
        answered = [r for r, s, _, _ in results if s == 200]
        assert answered, "the guard keeps a tenth of the loop for decisions; none answered"
        decisions.wait(answered, settle=1.0)
        assert all(len(decisions.by_id[r]) == 1 for r in answered)
        refused = [r for r, s, _, _ in results if s == 503]
        assert not any(r in decisions.by_id for r in refused)  # a shed request decided nothing
    finally:
        stop.set()
        producer.close()
        decisions.close()
        worker.stop()


def test_topic_requests_give_way_to_ingest_with_shed_no_fills_and_none_is_lost(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The ad-requests topic's side of the same guard: a slice of requests fetched while
    decisions are over their share gets ``shed`` no fills at once, unscored; every request
    still gets exactly one decision on ad-decisions."""
    unique = f"tguard-{uuid.uuid4().hex[:8]}"
    settings, worker, n_ads = guarded_worker(broker, tmp_path, unique)
    decisions = Decisions(settings)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=5, acks=1)
    stop = threading.Event()
    ingest = threading.Thread(target=events, args=(producer, settings, unique, stop))
    sent: list[str] = []
    try:
        worker.wait_until(lambda: worker.metric("adpulse_catalog_ads") == n_ads, 30, "catalog")
        ingest.start()
        # Ingest is applied, so the guard has heard how far behind it is; then the
        # requests arrive as one backlog. Its first slice is decided (no load yet), and
        # while the worker works through the rest its decisions hold most of the loop:
        # over the tenth they may keep, however fast the box is.
        worker.wait_until(lambda: worker.metric("adpulse_events_total") > 0, 30, "events")
        for i in range(BURST):
            rid = f"{unique}-r{i}"
            user = f"{unique}-u{i % 50}"
            producer.send(settings.topic("ad-requests"), key=user.encode(),
                          value=json.dumps(request(rid, user, "guard")).encode())  # fmt: skip
            sent.append(rid)
        producer.flush()
        decisions.wait(sent, timeout=60, settle=1.0)  # events still flowing meanwhile
        stop.set()
        ingest.join()
        assert all(len(decisions.by_id[r]) == 1 for r in sent)
        got = [decisions.by_id[r][0] for r in sent]
        shed = [d for d in got if d.get("no_fill_reason") == "shed"]
        assert shed, f"{len(sent)} topic requests next to ingest 1 ms behind, none shed"
        assert all((d["ad_id"], d["model_version"]) == (None, "none") for d in shed)
        assert any(d["ad_id"] is not None for d in got), "the guard keeps a tenth for decisions"
        worker.wait_until(
            lambda: worker.metric("adpulse_no_fill_total", 'reason="shed"') == len(shed),
            10, "the shed no fills counted",
        )  # fmt: skip
    finally:
        stop.set()
        if ingest.is_alive():
            ingest.join()
        producer.close()
        decisions.close()
        worker.stop()
