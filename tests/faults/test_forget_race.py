"""Forget while the user's events, and everyone else's, flow at 5,000 events/s.

An ingest batch reads each user's state, writes RocksDB, then sends the changelog
records partition by partition, awaiting the producer between partitions. A
forget handled in that gap used to put its tombstone in the changelog *before*
the batch's older value of the same user: the worker's own table said "gone",
but a worker restored from the changelog had the forgotten state back. Ingest
and forget now hold the partition's lock (streams/runtime/tablewriter.py
``PartitionLocks``) for their whole read-modify-write, changelog append included.

Checked here, on a real broker and worker: every forget is confirmed; each
forgotten user's state is gone or holds only a suffix of its events (those
applied after the forget: the two topics have no order between them, docs/security.md,
"Replays recreate state"), including every event sent after its confirmation
came back; every other user equals the reference over all its events; and a
worker restored from the changelogs into an empty data dir shows exactly the
same state for everyone.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from scoring.embeddings import HashedEmbeddings
from scoring.features import KINDS, InterestParams, reference_vectors
from streams.runtime.topicadmin import create_topics
from tests.faults.kit import CLIENT, Worker
from tests.integration.test_interest import assert_equals_reference, wait_applied

pytestmark = pytest.mark.integration
RATE = 5_000  # events/s, all users together (at most: a busy machine may produce fewer)
TICK_S = 0.01
OTHERS = [f"other{i}" for i in range(40)]
TARGETS = [f"target{i}" for i in range(24)]
FIRST_FORGET_S, FORGET_EVERY_S, RUN_S = 1.0, 0.3, 8.5
LAST_BURST = 20  # events a stopping target sends just before its forget request


@dataclass
class Target:
    """A user to forget: ``stops`` users send nothing after their forget request."""

    user: str
    forget_at: float
    stops: bool
    stop_after: float = 0.0  # a stopping target's events go on this long after its request
    request_id: str = ""
    sent: list[dict[str, Any]] = field(default_factory=list)
    confirmed_after: int = -1  # events of the user sent before the confirmation was read


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker whose producer lingers 50 ms: changelog batches then wait in the producer,
    so an ingest batch's send yields between partitions on most batches and the race
    needs no luck (at the default 1 ms it opens only when the producer falls behind).
    No per-user rate limit: at 5,000/s a user's random share passes 100 in some seconds."""
    create_topics(settings)
    extra = {"ADPULSE_PRODUCER_LINGER_MS": "50", "ADPULSE_MAX_EVENTS_PER_USER_S": "0"}
    w = Worker(settings, tmp_path, extra)
    yield w.start()
    w.stop()


class Confirmations(threading.Thread):
    """Reads forget-confirmations as they come; notes how many events each target had
    been sent by then (so events sent after it are known)."""

    def __init__(self, settings: Settings, targets: dict[str, Target]) -> None:
        super().__init__(daemon=True)
        self.targets = targets
        self.stopping = threading.Event()
        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, client_id=CLIENT,
                                      enable_auto_commit=False, fetch_max_wait_ms=20)  # fmt: skip
        topic = settings.topic("forget-confirmations")
        self.consumer.assign([TopicPartition(topic, p) for p in range(settings.partitions)])
        self.consumer.seek_to_beginning()

    def run(self) -> None:
        while not self.stopping.is_set():
            for records in self.consumer.poll(timeout_ms=100).values():
                for r in records:
                    t = self.targets.get(r.key.decode())
                    if t is not None and t.confirmed_after < 0:
                        t.confirmed_after = len(t.sent)
        self.consumer.close()

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(t.confirmed_after < 0 for t in self.targets.values()):
            assert time.monotonic() < deadline, "a forget was not confirmed"  # bench-ok: bound
            time.sleep(0.1)


def event(user: str, seq: int, rng: random.Random) -> dict[str, Any]:
    return {"event_id": f"{user}-{seq}", "user_id": user, "kind": rng.choice(KINDS),
            "item_id": rng.randrange(5000), "category_id": rng.randrange(40),
            "ts": int(time.time() * 1000)}  # fmt: skip


def flow(settings: Settings, targets: list[Target]) -> list[dict[str, Any]]:
    """Events at up to RATE for the others and the targets not yet stopped; each target's
    forget request sent at its time (a stopping target's last burst just before it);
    returns the others' events."""
    rng = random.Random(20171125)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, client_id=CLIENT, linger_ms=2,
                             acks=1, max_in_flight_requests_per_connection=1)  # fmt: skip
    topic = settings.topic("user-events")

    def send(e: dict[str, Any]) -> None:
        producer.send(topic, key=e["user_id"].encode(), value=json.dumps(e).encode())

    by_request: dict[str, Target] = {}
    confirmations = Confirmations(settings, by_request)
    confirmations.start()
    others: list[dict[str, Any]] = []
    seq = 0
    started = time.monotonic()
    ticks = 0
    try:
        while (now := time.monotonic() - started) < RUN_S:
            for t in targets:
                if not t.request_id and now >= t.forget_at:
                    for _ in range(LAST_BURST if t.stops else 0):
                        t.sent.append(event(t.user, seq := seq + 1, rng))
                        send(t.sent[-1])
                    t.request_id = f"race-{uuid.uuid4().hex[:12]}"
                    by_request[t.request_id] = t
                    body = {"request_id": t.request_id, "user_id": t.user,
                            "ts": int(time.time() * 1000)}  # fmt: skip
                    producer.send(settings.topic("forget-requests"), key=t.user.encode(),
                                  value=json.dumps(body).encode())  # fmt: skip
            for t in targets:  # one event a tick until it stops: its last batch is in
                # flight at a moment that varies from target to target
                if t.stops and t.request_id and now < t.forget_at + t.stop_after:
                    t.sent.append(event(t.user, seq := seq + 1, rng))
                    send(t.sent[-1])
            live = [t for t in targets if not (t.stops and t.request_id)]
            users = OTHERS + [t.user for t in live]
            for _ in range(int(RATE * TICK_S)):
                pick = rng.randrange(len(users))
                e = event(users[pick], seq := seq + 1, rng)
                (others if pick < len(OTHERS) else live[pick - len(OTHERS)].sent).append(e)
                send(e)
            ticks += 1
            time.sleep(max(0.0, started + ticks * TICK_S - time.monotonic()))
        # One more event per other user: every partition's log ends after each target's.
        for user in OTHERS:
            others.append(event(user, seq := seq + 1, rng))
            send(others[-1])
        producer.flush()
        confirmations.wait_all(timeout=120)
    finally:
        confirmations.stopping.set()
        confirmations.join(10)
        producer.close()
    return others


def assert_suffix(body: dict[str, Any] | None, t: Target, params: InterestParams) -> None:
    """Gone, or exactly the reference over the user's last ``n`` events (a suffix of what
    was sent, in partition order), with every event sent after the confirmation in it."""
    after_confirmation = len(t.sent) - t.confirmed_after
    if body is None:
        assert after_confirmation == 0, f"{t.user}: events after the confirmation lost"
        return
    n = sum(body["counts"].values())
    assert after_confirmation <= n <= len(t.sent), (t.user, n, len(t.sent), t.confirmed_after)
    suffix = t.sent[len(t.sent) - n :]
    table = HashedEmbeddings(params.dim, 20171125)
    ts, v, counts = reference_vectors(suffix, table, params)[t.user]
    assert body["counts"] == counts, f"{t.user}: {body['counts']} is not its last {n} events"
    assert body["reference_ts"] == ts
    got = np.array(body["vector_at_reference"])
    np.testing.assert_allclose(got, v, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(v).max())))


def stable(body: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if body is None else {k: v for k, v in body.items() if k != "vector_now"}


def test_forget_racing_5000_events_per_s_stays_forgotten_in_the_table_and_the_changelog(
    worker: WorkerProcess, settings: Settings, tmp_path: Path
) -> None:
    assert settings.embedding_seed == 20171125
    targets = [
        Target(
            user,
            FIRST_FORGET_S + i * FORGET_EVERY_S,
            stops=i % 4 != 3,
            stop_after=(i * 0.037) % 0.7,
        )
        for i, user in enumerate(TARGETS)
    ]
    others = flow(settings, targets)
    wait_applied(worker, others, timeout=120)  # every partition read past the targets' events
    assert_equals_reference(worker, others)  # the other users: untouched, nothing lost
    params = InterestParams.from_settings(settings)
    live = {u: stable(worker.interest(u)) for u in OTHERS + TARGETS}
    for t in targets:
        assert_suffix(live[t.user], t, params)
    gone = [t.user for t in targets if live[t.user] is None]
    sent = sum(len(t.sent) for t in targets) + len(others)
    print(f"\nforgotten and gone: {len(gone)} of {len(targets)}; {sent} events in "
          f"{RUN_S:.0f} s ({sent / RUN_S:.0f}/s)")  # fmt: skip

    # A worker restored from the changelogs into an empty data dir sees the same state.
    worker.stop()
    restored = WorkerProcess(settings.with_(data_dir=tmp_path / "wiped"), tmp_path, "restored")
    try:
        restored.start(timeout=120)
        back = {u: stable(restored.interest(u)) for u in OTHERS + TARGETS}
    finally:
        restored.stop()
    differ = [u for u in live if back[u] != live[u]]
    assert not differ, f"restored state differs for {differ}: " + "; ".join(
        f"{u}: live {live[u] and live[u]['counts']}, restored {back[u] and back[u]['counts']}"
        for u in differ
    )
