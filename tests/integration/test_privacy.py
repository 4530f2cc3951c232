"""Privacy and abuse against a real worker: loopback-only web server, a too-fast click not
labelled, and `adpulse forget` deleting a user's state for good (a restored worker too).

One worker for the module (a group join costs seconds); the forget test runs last, as it
replaces that worker with one restored from the changelogs into an empty data dir.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from adpulse.broker import EmbeddedBroker
from adpulse.cli import main
from adpulse.core.privacy import DEVELOPMENT_KEY, Pseudonymiser
from adpulse.core.settings import Settings
from adpulse.inspect import read_topic
from adpulse.workerproc import WorkerProcess
from streams.runtime.topicadmin import create_topics

pytestmark = pytest.mark.integration
pseudonym = Pseudonymiser(DEVELOPMENT_KEY)  # a worker on the embedded broker uses it


@pytest.fixture(scope="module")
def settings(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tag = f"priv-{uuid.uuid4().hex[:8]}"
    return Settings.from_env(
        {},
        bootstrap=broker.bootstrap,
        embedded_broker=True,
        embedded=broker.kind,
        topic_prefix=f"{tag}.",
        app_id=f"adpulse-{tag}",
        data_dir=tmp_path_factory.mktemp("privacy") / "data",
        session_timeout_s=6.0,
    )


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADPULSE_ATTRIBUTION_WINDOW_S", "2")
        mp.setenv("ADPULSE_WATERMARK_IDLE_S", "1")
        mp.delenv("ADPULSE_WEB_HOST", raising=False)  # the default is what is tested
        create_topics(settings)
        w = WorkerProcess(settings, tmp_path_factory.mktemp("logs")).start()
        yield w
        w.stop()


def send(settings: Settings, topic: str, key: str, records: list[dict[str, Any]]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=2, acks=1)
    for r in records:
        producer.send(settings.topic(topic), key=key.encode(), value=json.dumps(r).encode())
    producer.flush()
    producer.close()


def decision(did: str, user: str, ts: int) -> dict[str, Any]:
    """What the decide stage writes for raw user ``user`` (sent keyed by the raw id: the
    same partition the worker sends it to)."""
    return {"request_id": did, "user_id": pseudonym(user), "ad_id": "ad-1", "score": 0.1,
            "pctr": 0.05, "bid": 2.0, "propensity": 1.0, "policy": "greedy",
            "model_version": "v1", "ts": ts, "latency_ms": 1.0, "placement": "home"}  # fmt: skip


def event(eid: str, user: str, ts: int, **extra: Any) -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "kind": "browse", "item_id": 7,
            "category_id": 3, "ts": ts, **extra}  # fmt: skip


def labels(settings: Settings, ids: set[str]) -> dict[str, dict[str, Any]]:
    topic = settings.topic("ctr-feedback")
    records = read_topic(settings.bootstrap, topic, idle_s=0.5, timeout_s=5)  # bench-ok: a bound
    out = {}
    for r in records:
        rec = json.loads(r.value or b"{}")
        if rec.get("decision_id") in ids:
            out[rec["decision_id"]] = rec
    return out


def metric(worker: WorkerProcess, name: str) -> float:
    return worker.metric(name)


def non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


def test_a_worker_with_default_settings_serves_http_on_loopback_only(
    worker: WorkerProcess,
) -> None:
    port = worker.settings.web_port
    assert Settings().web_host == "127.0.0.1"
    found = listening_addresses(port)
    if not found:
        pytest.skip("no /proc/net/tcp: cannot read the bound address")
    assert found == {"0100007F"}, found  # 127.0.0.1, and nothing on IPv6
    addr = non_loopback_address()
    if addr is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((addr, port), timeout=5).close()  # bench-ok: a wait bound


def test_a_click_10_ms_after_its_decision_is_not_labelled_clicked_and_is_counted(
    worker: WorkerProcess, settings: Settings
) -> None:
    # too_fast counts from the click's broker time (LogAppendTime), not its ts: fast-1 is
    # made 1 s ahead, so its click reaches the broker before it (unless sending these four
    # records takes over 1.15 s); slow-1 was made 1 s ago, so its click is a second late.
    now = int(time.time() * 1000)
    send(settings, "ad-decisions", "carol", [decision("fast-1", "carol", now + 1000),
                                             decision("slow-1", "carol", now - 1000)])  # fmt: skip
    send(settings, "user-events", "carol", [
        event("c1", "carol", now + 1010, kind="click", ad_id="ad-1", decision_id="fast-1"),
        event("c2", "carol", now - 200, kind="click", ad_id="ad-1", decision_id="slow-1"),
    ])  # fmt: skip
    got: dict[str, dict[str, Any]] = {}

    def labelled() -> bool:
        got.update(labels(settings, {"fast-1", "slow-1"}))
        return len(got) == 2

    worker.wait_until(labelled, 30, "labels of fast-1 and slow-1")  # bench-ok: a wait bound
    assert got["fast-1"]["clicked"] == 0 and got["fast-1"]["reason"] == "window_expired"
    assert got["slow-1"]["clicked"] == 1  # the same user's human-speed click counts
    assert got["fast-1"]["user_id"] == pseudonym("carol")
    assert metric(worker, 'adpulse_suspect_clicks_total{rule="too_fast"}') == 1


@pytest.mark.long  # ~15 s, a restart: make test stays under 10 minutes
def test_forget_deletes_a_users_state_and_a_restored_worker_does_not_bring_it_back(
    worker: WorkerProcess,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = int(time.time() * 1000)
    for user in ("alice", "bob"):
        send(settings, "user-events", user, [event(f"{user}-{i}", user, now - i) for i in range(3)])
    send(settings, "ad-decisions", "alice", [decision("alice-d1", "alice", now)])
    worker.wait_until(
        lambda: all(worker.interest(u) is not None for u in ("alice", "bob")), 30, "interest"
    )  # bench-ok: a wait bound
    labelled = lambda: "alice-d1" in labels(settings, {"alice-d1"})  # noqa: E731
    worker.wait_until(labelled, 30, "alice's label")  # bench-ok: a wait bound
    bob_before = worker.interest("bob")

    monkeypatch.setenv("ADPULSE_TOPIC_PREFIX", settings.topic_prefix)
    args = ["forget", "alice", "--wait", "--timeout", "60", "--bootstrap", settings.bootstrap]
    rc = main(args)  # bench-ok: --timeout is a wait bound
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "confirmed: deleted interest 1, freqcap 0, pending 1 record(s)" in out
    assert worker.interest("alice") is None
    status, body = worker.get(f"/pseudonyms/{pseudonym('alice')}/interest")
    assert status == 404 and "alice" not in json.dumps(body).replace(pseudonym("alice"), "")
    bob_now = worker.interest("bob")
    assert bob_before is not None and bob_now is not None
    assert bob_now["vector_at_reference"] == bob_before["vector_at_reference"]

    # The changelogs end in tombstones for alice's keys; bob's are untouched.
    prefix = settings.app_id
    interest_log = read_topic(settings.bootstrap, f"{prefix}-interest-changelog", idle_s=0.5)
    pending_log = read_topic(settings.bootstrap, f"{prefix}-pending-changelog", idle_s=0.5)
    last = {r.key: r.value for r in interest_log + pending_log}
    assert last[pseudonym("alice").encode()] is None and last[b"alice-d1"] is None
    assert last[pseudonym("bob").encode()] is not None
    # The behaviour sequence goes with the interest.
    sequence_log = read_topic(settings.bootstrap, f"{prefix}-sequence-changelog", idle_s=0.5)
    last_seq = {r.key: r.value for r in sequence_log}
    assert last_seq[pseudonym("alice").encode()] is None
    assert last_seq[pseudonym("bob").encode()] is not None

    # A fresh worker restored from the changelogs into an empty data dir: alice stays gone.
    worker.stop()
    restored = WorkerProcess(settings.with_(data_dir=tmp_path / "wiped"), tmp_path, "restored")
    try:
        restored.start()
        assert restored.interest("alice") is None
        assert restored.interest("bob") is not None
        bob_restored = restored.interest("bob")
        assert bob_restored is not None and bob_restored["counts"] == bob_before["counts"]
    finally:
        restored.stop()
