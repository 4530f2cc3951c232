"""Interest features end to end: real broker, real worker process, real RocksDB and changelog."""

from __future__ import annotations

import base64
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer

from adpulse.core.settings import Settings
from adpulse.inspect import read_topic
from adpulse.replay import read_taobao
from adpulse.workerproc import WorkerProcess
from scoring.embeddings import HashedEmbeddings
from scoring.features import KINDS, InterestParams, reference_categories, reference_vectors
from scoring.sequence import reference_sequences
from streams.runtime.topicadmin import create_topics

pytestmark = pytest.mark.integration
DAY = 24 * 3600 * 1000
# These tests load history at full speed (hundreds of one user's events within a second of
# broker time): a backfill, which the live rate limit would refuse as a flood. Not under
# test here (tests/unit/test_abuse.py, tests/integration/test_partition_keys.py).
BACKFILL = {"ADPULSE_MAX_EVENTS_PER_USER_S": "0"}


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    create_topics(settings)
    w = WorkerProcess(settings, tmp_path, extra_env=BACKFILL)
    yield w.start()
    w.stop()


def produce(settings: Settings, payloads: list[bytes], keys: list[bytes], chunk: int = 0) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=2, acks=1)
    topic = settings.topic("user-events")
    for i, (k, v) in enumerate(zip(keys, payloads, strict=True)):
        producer.send(topic, key=k, value=v)
        if chunk and i % chunk == chunk - 1:
            producer.flush()
            time.sleep(0.05)  # several batches, not one
    producer.flush()
    producer.close()


def produce_events(settings: Settings, events: list[dict[str, Any]], chunk: int = 0) -> None:
    produce(
        settings,
        [json.dumps(e).encode() for e in events],
        [e["user_id"].encode() for e in events],
        chunk,
    )


def synthetic(n: int, users: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    base = int(time.time() * 1000) - 10 * DAY
    return [
        {
            "event_id": f"s{seed}-{i}",
            "user_id": f"user{rng.randrange(users)}",
            "kind": rng.choice(KINDS),
            "item_id": rng.randrange(5000),
            "category_id": rng.randrange(80),
            "ts": base + rng.randrange(9 * DAY),
        }
        for i in range(n)
    ]


def wait_applied(worker: WorkerProcess, events: list[dict[str, Any]], timeout: float = 60) -> None:
    """Until every user's counters add up to its number of distinct events."""
    expect = Counter(u for u, _ in {(e["user_id"], e["event_id"]) for e in events})

    def done() -> bool:
        for user, n in expect.items():
            body = worker.interest(user)
            if body is None or sum(body["counts"].values()) != n:
                return False
        return True

    worker.wait_until(done, timeout, f"{sum(expect.values())} events applied")


def assert_equals_reference(worker: WorkerProcess, events: list[dict[str, Any]]) -> None:
    s = worker.settings
    params = InterestParams.from_settings(s)
    ref = reference_vectors(events, HashedEmbeddings(s.dim, s.embedding_seed), params)
    ref_cats = reference_categories(events, params)
    seq_ref = reference_sequences(events, s.sequence_length)
    for user, (t, v, counts) in ref.items():
        body = worker.interest(user)
        assert body is not None, f"no state for {user}"
        assert body["reference_ts"] == t
        got = np.array(body["vector_at_reference"])
        np.testing.assert_allclose(got, v, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(v).max())))
        assert body["counts"] == counts, f"{user}: counted {body['counts']} expected {counts}"
        # The behaviour sequence: the last N, exactly, newest first.
        want = [{"ts": t, "item_id": i, "category_id": c, "kind": KINDS[k]}
                for t, i, c, k in seq_ref.get(user, [])]  # fmt: skip
        assert body.get("sequence") == want, f"{user}: sequence differs from the reference"
        # Top categories: the heaviest exact weights (nothing is dropped in these runs).
        assert body["top_categories_error"] < 1e-18
        exact = sorted(ref_cats[user].items(), key=lambda c: (-c[1], c[0]))[: params.top_k]
        top = [(c["category_id"], c["weight"]) for c in body["top_categories"]]
        for (c, w), (ec, ew) in zip(top, exact, strict=True):
            assert w == pytest.approx(ew, rel=1e-5), f"{user}: {top} expected {exact}"
            assert c == ec or ref_cats[user][c] == pytest.approx(ew, rel=2e-5)  # a near-tie


def test_taobao_replay_gives_reference_vectors_for_all_43_users(
    worker: WorkerProcess, settings: Settings, taobao: Path
) -> None:
    events = [
        {"event_id": e.event_id, "user_id": e.user_id, "kind": e.kind, "item_id": e.item_id,
         "category_id": e.category_id, "ts": e.ts}
        for e in read_taobao(taobao)
    ]  # fmt: skip
    produce_events(settings, events, chunk=500)
    wait_applied(worker, events)
    assert len({e["user_id"] for e in events}) == 43
    assert_equals_reference(worker, events)


def test_shuffled_duplicated_and_late_events_equal_reference(
    worker: WorkerProcess, settings: Settings
) -> None:
    events = synthetic(3000, users=40, seed=1)
    rng = random.Random(2)
    rng.shuffle(events)
    # Late: the oldest 10% arrive after everything else.
    cutoff = sorted(e["ts"] for e in events)[300]
    events.sort(key=lambda e: e["ts"] < cutoff)
    # Duplicates: 300 events sent again soon after the original (a retrying producer).
    sent = list(events)
    for i in sorted(rng.sample(range(len(events)), 300), reverse=True):
        sent.insert(min(len(sent), i + rng.randrange(1, 4)), dict(events[i]))
    produce_events(settings, sent, chunk=250)
    wait_applied(worker, events)
    assert_equals_reference(worker, events)
    assert worker.metric("adpulse_events_total", 'outcome="duplicate"') == 300


def malformed(i: int, now_ms: int) -> bytes:
    good = {"event_id": f"bad{i}", "user_id": "mallory", "kind": "browse", "item_id": 1,
            "category_id": 2, "ts": now_ms}  # fmt: skip
    variants: list[bytes] = [
        b"{not json",
        json.dumps({**good, "item_id": "one"}).encode(),
        json.dumps({**good, "kind": "view"}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "user_id"}).encode(),
        json.dumps({**good, "ts": now_ms + 3_600_000}).encode(),
        json.dumps({**good, "user_id": "x" * 9000}).encode(),
        b"\xff\xfe\x00",
        b"[1, 2, 3]",
        json.dumps({**good, "price": -1}).encode(),
        b"",
    ]
    return variants[i % len(variants)]


def test_malformed_messages_are_dead_lettered_and_valid_ones_all_applied(
    worker: WorkerProcess, settings: Settings
) -> None:
    now = int(time.time() * 1000)
    valid = synthetic(1000, users=20, seed=3)
    payloads, keys = [], []
    for i, e in enumerate(valid):
        payloads += [json.dumps(e).encode(), malformed(i, now)]
        keys += [e["user_id"].encode(), b"mallory"]
    produce(settings, payloads, keys, chunk=200)
    wait_applied(worker, valid)
    assert_equals_reference(worker, valid)
    assert worker.interest("mallory") is None

    letters = read_topic(settings.bootstrap, settings.topic("dead-letters"), expect=1000, idle_s=1)
    bodies = [json.loads(r.value or b"") for r in letters]
    assert len(bodies) == 1000
    reasons = Counter(b["error"] for b in bodies)
    assert reasons == {"invalid_json": 300, "schema": 500, "future_ts": 100, "too_large": 100}
    assert all(b["topic"] == settings.topic("user-events") and b["message"] for b in bodies)
    # Each dead letter points back at its source message and carries its bytes.
    source = {
        (r.partition, r.offset): r.value
        for r in read_topic(
            settings.bootstrap, settings.topic("user-events"), expect=2000, idle_s=1
        )
    }
    for b in bodies:
        original = source[(b["partition"], b["offset"])] or b""
        assert base64.b64decode(b["payload_b64"]) == original


def test_unknown_user_is_404_and_known_user_has_counts_and_top_categories(
    worker: WorkerProcess, settings: Settings
) -> None:
    events = synthetic(50, users=1, seed=4)
    produce_events(settings, events)
    wait_applied(worker, events)
    status, body = worker.get("/users/nobody/interest")
    assert status == 404 and body["error"] == "unknown user"
    body = worker.interest("user0")
    assert body is not None
    assert sum(body["counts"].values()) == 50
    assert len(body["top_categories"]) == settings.top_categories
    weights = [c["weight"] for c in body["top_categories"]]
    assert weights == sorted(weights, reverse=True)
    assert len(body["vector_now"]) == settings.dim


def test_after_recovery_the_tables_own_changelogs_hold_up_no_fetch(
    worker: WorkerProcess, settings: Settings
) -> None:
    """Recovery pauses the active partitions' changelogs in the client.

    Nothing reads them after recovery, so without that pause aiokafka fetched the first
    records the worker wrote to each one and held them unread, and while fetched records
    wait unread it sends the broker no fetch for 0.1 s: every source partition waited.
    Three rounds, each applied before the next is sent, so the later rounds' fetches come
    after the earlier rounds' changelog records are in the log.
    """
    sent: list[dict[str, Any]] = []
    for seed in range(3):
        sent += synthetic(200, 40, seed=100 + seed)
        produce_events(settings, sent[-200:])
        wait_applied(worker, sent)
    assert worker.metric("adpulse_table_writes_total") > 0
    status, text = worker.get("/metrics")
    held = [line for line in str(text).splitlines()
            if line.startswith("adpulse_consumer_unread_changelog_partitions ")]  # fmt: skip
    assert (status, held) == (200, ["adpulse_consumer_unread_changelog_partitions 0.0"])
