"""A real Prometheus scrapes a real worker through the shipped config and alert rules.

Prometheus runs from Debian's ``prometheus`` package (``make test`` installs it
when run as root); without the binary the test is skipped with the reason. The
shipped ``deploy/prometheus/prometheus.yml`` is used with only its targets, its
intervals (1 s) and the rules path rewritten, so the alert rules are loaded and
evaluated by the same server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaProducer

from adpulse import replay
from adpulse.broker import free_port
from adpulse.catalogtool import publish, synthetic_ads
from adpulse.settings import Settings
from adpulse.topics import create_topics
from adpulse.workerproc import WorkerProcess

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


class Prometheus:
    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait(lambda: self._ready(), 30, "prometheus ready (/-/ready)")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            msg = f"prometheus exited with {self.proc.returncode}:\n{self.tail()}"
            raise AssertionError(msg)
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return int(r.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query; None while it has no result."""
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bench-ok: a wait bound
            if check():
                return
            time.sleep(0.5)
        msg = f"timed out after {timeout:.0f}s waiting for {what}:\n{self.tail()}"
        raise AssertionError(msg)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def scrape_config(worker_url: str, out: Path) -> Path:
    """The shipped prometheus.yml, pointed at one worker, scraping every second."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [worker_url.removeprefix("http://")]}]
    out.write_text(yaml.safe_dump(config))
    return out


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    create_topics(settings)
    w = WorkerProcess(settings, tmp_path)
    yield w.start()
    w.stop()


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
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
    config = scrape_config(worker.url, tmp_path / "prometheus.yml")
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
    prometheus: Prometheus, worker: WorkerProcess, settings: Settings, taobao: Path
) -> None:
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
    assert (prometheus.value("count(adpulse_freshness_seconds_bucket)") or 0) > 10
    p99 = prometheus.value(
        "histogram_quantile(0.99, sum by (le) (adpulse_decision_latency_seconds_bucket))"
    )
    assert p99 is not None
    assert 0 < p99 < 10
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
