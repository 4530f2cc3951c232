"""The link between worker and broker cut for 10 s while events and ad requests flow.

A dedicated embedded broker advertises the port of a TCP proxy that lives in this test, so
every Kafka connection (bootstrap and after Metadata) goes through the proxy.
The proxy reads the client id of each connection's first request: the test's
own clients (``fault-app``, standing in for the apps) are never cut; the
worker's are closed and refused for the length of the cut, as when its
network fails. The worker must stay up, say so (/health 503, the broker gauge
0), reconnect by itself when the link returns, and lose nothing: every event
applied exactly once (vector equal to the numpy reference), every request
answered.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from adpulse.broker import embedded_broker, free_port
from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from adpulse.netcut import Proxy
from streams.runtime.topicadmin import create_topics
from tests.faults.kit import CLIENT, Reader, Worker, scrape
from tests.integration.test_decisions import ad
from tests.integration.test_interest import assert_equals_reference, synthetic, wait_applied

pytestmark = pytest.mark.integration
CUT_S = 10.0


@pytest.fixture
def cut_settings(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Proxy]]:
    """Settings whose bootstrap is the proxy in front of a dedicated broker that advertises it."""
    port = free_port()
    proxy = Proxy(port, CLIENT)
    broker = embedded_broker(settings, port, tmp_path / "broker.log", advertised_port=proxy.port)
    with broker:
        try:
            yield settings.with_(bootstrap=f"127.0.0.1:{proxy.port}"), proxy
        finally:
            proxy.close()


def rss_kib(worker: Worker) -> int:
    assert worker.proc is not None
    status = Path(f"/proc/{worker.proc.pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS")))


def test_worker_rides_out_a_10s_broker_cut_and_loses_nothing(
    cut_settings: tuple[Settings, Proxy], tmp_path: Path
) -> None:
    settings, proxy = cut_settings
    create_topics(settings)
    publish(settings.bootstrap, settings.topic("ad-catalog"), [ad("cut-0", "cut", 1.0, 4756105)])
    events = synthetic(6000, users=80, seed=5)
    worker = Worker(settings, tmp_path, {}).start()
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, client_id=CLIENT, linger_ms=2)
    requests: list[str] = []
    done = threading.Event()

    def flow() -> None:  # ~400 events/s and 20 requests/s, through the cut
        for i in range(0, len(events), 20):
            for e in events[i : i + 20]:
                producer.send(settings.topic("user-events"), key=e["user_id"].encode(),
                              value=json.dumps(e).encode())  # fmt: skip
            rid = f"cut-r{len(requests)}"
            r = {"request_id": rid, "user_id": f"user{i % 80}", "placement": "cut",
                 "ts": int(time.time() * 1000)}  # fmt: skip
            producer.send(settings.topic("ad-requests"), key=r["user_id"].encode(),
                          value=json.dumps(r).encode())  # fmt: skip
            requests.append(rid)
            producer.flush()
            time.sleep(0.05)
        done.set()

    def applied() -> float:
        return scrape(worker, "adpulse_events_total")

    feeder = threading.Thread(target=flow, daemon=True)
    feeder.start()
    decisions = Reader(settings, "ad-decisions")
    try:
        worker.wait_until(lambda: applied() > 500, 30, "events flowing before the cut")
        rss_before = rss_kib(worker)
        proxy.cut()
        at_cut = applied()
        cut_at = time.monotonic()
        seen: list[tuple[float, int | None, float]] = []  # (s into the cut, /health, gauge)
        while time.monotonic() - cut_at < CUT_S:  # bench-ok: the cut's length
            seen.append((time.monotonic() - cut_at, worker.health(),
                         scrape(worker, "adpulse_broker_connected")))  # fmt: skip
            time.sleep(0.25)
        rss_during = rss_kib(worker)
        during = applied()
        proxy.restore()
        back_at = time.monotonic()
        worker.wait_until(lambda: applied() > during, 60, "processing after the link returned")
        resumed_s = time.monotonic() - back_at
        worker.wait_until(lambda: worker.health() == 200, 60, "/health 200 after the cut")
        healthy_s = time.monotonic() - back_at

        assert done.wait(120)  # bench-ok: a wait bound
        wait_applied(worker, events, timeout=90)
        assert_equals_reference(worker, events)
        decisions.until(lambda: set(requests) <= set(decisions.json_by("request_id")), 60,
                        "a decision for every request")  # fmt: skip
        assert worker.proc is not None and worker.proc.poll() is None  # it never exited
        unreachable = [s for s in seen if s[1] == 503 and s[2] == 0]
        assert unreachable, f"the worker never reported the broker unreachable: {seen}"
        assert seen[0][1] == 200 and scrape(worker, "adpulse_broker_connected") == 1
        assert proxy.refused > 0  # it did try to reconnect during the cut
        log = worker.log_path.read_text(errors="replace")
        assert "broker unreachable" in log and "broker reachable again" in log
        report: dict[str, Any] = {
            "resumed_s": round(resumed_s, 2), "health_200_s": round(healthy_s, 2),
            "unreachable_after_s": round(unreachable[0][0], 2),
            "rss_before_kib": rss_before, "rss_end_of_cut_kib": rss_during,
            "reconnects_refused": proxy.refused,
            "events_applied_during_cut": during - at_cut,
            "duplicate_decisions": len(decisions.records) - len(requests),
        }  # fmt: skip
        print(f"\nbroker cut: {json.dumps(report)}")
    finally:
        producer.close()
        decisions.close()
        worker.stop()
