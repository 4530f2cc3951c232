"""A real Prometheus scrapes a real worker through the shipped config and alert rules.

Prometheus runs from Debian's ``prometheus`` package (``make test`` installs it
when run as root); without the binary the test is skipped with the reason. The
shipped ``deploy/prometheus/prometheus.yml`` is used with only its targets, its
intervals (1 s) and the rules path rewritten, so the alert rules are loaded and
evaluated by the same server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from adpulse import prometheus as prom
from adpulse import replay
from adpulse.catalogtool import publish, synthetic_ads
from adpulse.core.metrics import LATENCY_BUCKETS
from adpulse.core.settings import Settings
from adpulse.plots import dashboard_png
from adpulse.prometheus import Prometheus, scrape_config
from adpulse.workerproc import WorkerProcess
from streams.runtime.topicadmin import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    create_topics(settings)
    w = WorkerProcess(settings, tmp_path)
    yield w.start()
    w.stop()


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    binary = prom.binary()
    if binary is None:
        pytest.skip(
            "prometheus not on PATH: `make test` installs Debian's prometheus package when "
            "run as root with apt; as a developer run `sudo apt-get install prometheus`"
        )
    return binary


@pytest.fixture
def prometheus(
    prometheus_binary: str, worker: WorkerProcess, tmp_path: Path
) -> Iterator[Prometheus]:
    config = scrape_config([worker.url], tmp_path / "prometheus.yml")
    p = Prometheus(prometheus_binary, config, tmp_path)
    yield p
    p.stop()


def ask_for_ads(settings: Settings, users: list[str]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, acks=1)
    for i, user in enumerate(users):
        req = {"request_id": f"prom-{i}", "user_id": user, "placement": "home",
               "ts": int(time.time() * 1000), "context": {"device": "mobile"}}  # fmt: skip
        producer.send(
            settings.topic("ad-requests"), key=user.encode(), value=json.dumps(req).encode()
        )
    producer.flush()
    producer.close()


def test_prometheus_scrapes_a_worker_replaying_taobao_through_the_shipped_config(
    prometheus: Prometheus, worker: WorkerProcess, settings: Settings, taobao: Path, tmp_path: Path
) -> None:
    started = time.time()
    events = replay.rebased(replay.read_taobao(taobao), int(time.time() * 1000))
    ads = synthetic_ads(50, [e.category_id for e in events], seed=1)
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    assert replay.produce(events, settings.bootstrap, settings.topic("user-events")) == 4321
    ask_for_ads(settings, sorted({e.user_id for e in events})[:20])

    def scraped() -> bool:
        return (
            prometheus.value("sum(adpulse_events_total)") == 4321
            and (prometheus.value("sum(adpulse_decisions_total)") or 0) >= 20
            and prometheus.value("count(adpulse_consumer_lag_messages)") is not None
        )

    prometheus.wait(scraped, 45, "events, decisions and consumer lag scraped")
    assert prometheus.value('up{job="adpulse"}') == 1
    assert prometheus.value("sum(adpulse_dead_letters_total)") is None  # none, so no series
    buckets = prometheus.value('count(adpulse_decision_latency_seconds_bucket{le="+Inf"})')
    assert buckets == 1
    series = prometheus.value("count(adpulse_freshness_seconds_bucket)") or 0
    assert series > 10  # every bucket of the freshness histogram scraped
    p99 = prometheus.value(
        "histogram_quantile(0.99, sum by (le) (adpulse_decision_latency_seconds_bucket))"
    )
    assert p99 is not None
    # Not a speed claim: histogram_quantile answers within the histogram's finite buckets
    # whatever the decisions took, so this checks the series is our histogram, whole.
    assert 0 < p99 <= LATENCY_BUCKETS[-1]
    assert prometheus.value('count(adpulse_build_info{version!=""})') == 1
    assert prometheus.value("count(adpulse_model_info)") == 1
    assert (prometheus.value("max(adpulse_catalog_ads)") or 0) > 0
    # Sampled every 5 s: every partition read up to its high watermark, the table sized.
    prometheus.wait(
        lambda: (
            prometheus.value("max(adpulse_consumer_lag_messages)") == 0
            and (prometheus.value('sum(adpulse_table_keys{table="interest"})') or 0) > 0
        ),
        15,
        "consumer lag back to 0 and interest table keys counted",
    )

    # The shipped alert rules are loaded and evaluated by this server.
    def rules() -> list[dict[str, Any]]:
        return [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]

    prometheus.wait(lambda: all(r["health"] == "ok" for r in rules()), 10, "rules evaluated")
    assert len(rules()) >= 6

    # Every Grafana panel's own queries, run against this server, drawn to a PNG
    # (a query Prometheus rejects raises here).
    png = dashboard_png(prometheus, started - 5, time.time(), tmp_path / "dashboard.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
