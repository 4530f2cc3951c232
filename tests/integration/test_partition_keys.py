"""Records on the wrong partition, event times out of range, and a client that spreads its
timestamps: two real workers sharing the topics of a real broker.

A user's state lives on the partition their raw id is hashed to. A record keyed by
another id, or by none, would write it (or read it, or delete it) somewhere else, where
with two workers it splits from the rest; the engine dead-letters such records
(``key_mismatch``) on every topic keyed by user. The rate limit counts by broker time
(``user-events`` is created with LogAppendTime), so timestamps spread over hours do not
hide a burst.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kafka import KafkaProducer

from adpulse.broker import EmbeddedBroker
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from streams.runtime.topicadmin import create_topics
from tests.conftest import isolated
from tests.faults.kit import Reader
from tests.integration.test_decisions import partition_of

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes
HOUR = 3_600_000
LIMIT = 5  # events per user per second of broker time
EXTRA = {"ADPULSE_MAX_EVENTS_PER_USER_S": str(LIMIT)}


@dataclass
class Pair:
    settings: Settings
    a: WorkerProcess
    b: WorkerProcess
    producer: KafkaProducer
    dead: Reader
    tag: str

    def id(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def send(
        self, topic: str, key: str | None, value: dict[str, Any], **kw: Any
    ) -> tuple[int, int]:
        """Acknowledged; (partition, offset). ``kw``: an explicit partition for a keyless one."""
        sent = self.producer.send(self.settings.topic(topic), key=None if key is None else
                                  key.encode(), value=json.dumps(value).encode(), **kw)  # fmt: skip
        meta = sent.get(10)
        return meta.partition, meta.offset

    def letters(self) -> dict[tuple[str, int, int], str]:
        """(topic, partition, offset) -> reason, of every dead letter read so far."""
        self.dead.poll()
        out = {}
        for r in self.dead.records:
            d = json.loads(r.value)
            out[(d["topic"], d["partition"], d["offset"])] = d["error"]
        return out


def event(eid: str, user: str, ts: int, kind: str = "browse") -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "kind": kind, "item_id": 7, "category_id": 3,
            "ts": ts}  # fmt: skip


def counted(worker: WorkerProcess, user: str) -> int:
    body = worker.interest(user)  # the raw id picks the partition; a non-owner forwards
    return 0 if body is None else sum(body["counts"].values())


def assigned(worker: WorkerProcess, topic: str) -> set[int]:
    """Partitions of ``topic`` the worker reports consumer lag for (its assignment)."""
    try:
        status, text = worker.get("/metrics")
    except OSError:
        return set()
    out = set()
    for line in str(text).splitlines() if status == 200 else []:
        if line.startswith("adpulse_consumer_lag_messages{") and f'topic="{topic}"' in line:
            out.add(int(line.split('partition="', 1)[1].split('"', 1)[0]))
    return out


@pytest.fixture(scope="module")
def pair(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    unique = f"keys-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp(unique)
    settings = isolated(broker, unique, tmp / "a")
    create_topics(settings)
    a = WorkerProcess(settings, tmp, name="a", extra_env=EXTRA).start()
    b = WorkerProcess(settings.with_(data_dir=tmp / "b"), tmp, name="b", extra_env=EXTRA).start()
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=1, acks="all")
    pair = Pair(settings, a, b, producer, Reader(settings, "dead-letters"), unique)
    try:
        topic = settings.topic("user-events")
        now = int(time.time() * 1000)
        for part in range(settings.partitions):  # one event per partition: lag shows assignment
            user = next(u for u in (f"{unique}-probe{i}" for i in range(1000))
                        if partition_of(u, settings.partitions) == part)  # fmt: skip
            pair.send("user-events", user, event(f"{user}-e", user, now))
        a.wait_until(
            lambda: assigned(a, topic) and assigned(b, topic)
            and assigned(a, topic) | assigned(b, topic) == set(range(settings.partitions)),
            60, "both workers to own user-events partitions",
        )  # fmt: skip
        yield pair
    finally:
        producer.close()
        pair.dead.close()
        b.stop()
        a.stop()


def test_records_keyed_by_another_user_or_by_none_are_dead_lettered_on_every_user_topic(
    pair: Pair,
) -> None:
    p, parts = pair, pair.settings.partitions
    victim = p.id("victim")
    home = partition_of(victim, parts)
    attacker = next(u for u in (p.id(f"attacker{i}") for i in range(100))
                    if partition_of(u, parts) != home)  # fmt: skip
    now = int(time.time() * 1000)
    for i in range(3):
        p.send("user-events", victim, event(p.id(f"v{i}"), victim, now - (i + 1) * HOUR))
    topic = p.settings.topic
    bad = {
        (topic("user-events"), *p.send("user-events", attacker,
                                       event(p.id("x1"), victim, now, "purchase"))): "key_mismatch",
        (topic("user-events"), *p.send("user-events", None, event(p.id("x2"), victim, now),
                                       partition=(home + 1) % parts)): "key_mismatch",
        (topic("user-events"), *p.send("user-events", victim,
                                       event(p.id("x3"), victim, 0))): "too_old",  # 1970
        (topic("ad-requests"), *p.send("ad-requests", attacker,
                                       {"request_id": p.id("r1"), "user_id": victim,
                                        "placement": "home", "ts": now})): "key_mismatch",
        (topic("forget-requests"), *p.send("forget-requests", attacker,
                                           {"request_id": p.id("f1"), "user_id": victim,
                                            "ts": now})): "key_mismatch",
    }  # fmt: skip
    p.dead.until(lambda: bad.keys() <= p.letters().keys(), 60, "five dead letters")
    assert {k: p.letters()[k] for k in bad} == bad
    # The victim's state holds their own three events, whichever worker is asked: the forged
    # purchase was not applied anywhere and the forged forget deleted nothing.
    p.a.wait_until(lambda: counted(p.a, victim) == 3, 30, "the victim's three events")
    assert counted(p.b, victim) == 3
    same = ("pseudonym", "counts", "reference_ts", "vector_at_reference")
    got_a, got_b = p.a.interest(victim), p.b.interest(victim)
    assert got_a is not None and got_b is not None
    assert {k: got_a[k] for k in same} == {k: got_b[k] for k in same}
    for w in (p.a, p.b):
        assert w.get("/health")[0] == 200


def test_a_client_spreading_its_timestamps_is_limited_at_the_rate_the_broker_sees(
    pair: Pair,
) -> None:
    """50 events sent in one burst (10x the limit of 5 a second), their ts one hour apart:
    the producer holds them until ``flush`` and sends them as one batch, which the broker
    stamps with one LogAppendTime however slowly they were sent, and the worker admits
    exactly ``LIMIT`` per second of those stamps, read back from the topic."""
    p = pair
    user = p.id("evader")
    now = int(time.time() * 1000)
    burst = KafkaProducer(bootstrap_servers=p.settings.bootstrap, linger_ms=60_000,
                          batch_size=1 << 20, acks="all")  # fmt: skip
    for i in range(50):
        value = json.dumps(event(p.id(f"ev{i}"), user, now - (i + 1) * HOUR)).encode()
        burst.send(p.settings.topic("user-events"), key=user.encode(), value=value)
    burst.flush()
    burst.close()
    sent = Reader(p.settings, "user-events")
    try:
        sent.until(lambda: sum(r.key == user.encode() for r in sent.records) == 50, 30, "50 sent")
        records = [r for r in sent.records if r.key == user.encode()]
    finally:
        sent.close()
    assert {r.timestamp_type for r in records} == {1}  # LogAppendTime: the broker's clock
    per_second = Counter(r.timestamp // 1000 for r in records)
    admitted = sum(min(n, LIMIT) for n in per_second.values())
    # The premise, not a speed: some second of broker time held more than the limit, so
    # the worker had something to refuse (one batch, one stamp: it holds by construction).
    assert admitted < len(records), f"the burst spread over {len(per_second)} seconds"
    topic = p.settings.topic("user-events")
    mine = {(topic, r.partition, r.offset) for r in records}

    def limited() -> int:
        return sum(reason == "rate_limited" for k, reason in p.letters().items() if k in mine)

    p.dead.until(lambda: limited() == 50 - admitted, 60, f"{50 - admitted} rate_limited")
    p.a.wait_until(lambda: counted(p.a, user) == admitted, 30, f"{admitted} admitted")
    assert counted(p.b, user) == admitted
