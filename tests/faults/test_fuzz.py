"""Fuzzed input on every input topic: each message applied or dead-lettered once, never a crash.

10,000 Hypothesis-drawn payloads per topic (tests/faults/fuzzing.py) plus known-valid
records. In process, every decoder's verdict must equal the reference verdict
(JSON Schema over a strict reading of the bytes). Then the same messages go
through the real broker to one real worker: each invalid one must come back
exactly once on dead-letters (counted by its source topic, partition and
offset, with its bytes and a reason), each valid one must take effect, and the
worker must stay healthy and handle a sentinel sent after everything else.

The worker runs with production settings, its per-user rate limiter on: a burst
of valid events from one user in one second, sent among the others, must come
back as ``rate_limited`` dead letters exactly beyond the limit, never lost.
"""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaError

from adpulse.core.settings import Settings
from streams.catalog import check_catalog_record
from streams.deadletter import MAX_KEPT_BYTES, Raw, Rejected
from streams.decide import request_decoder
from streams.ingest import decode_events
from streams.learn import feedback_decoder
from streams.runtime.topicadmin import create_topics
from streams.validate import split_by_key
from tests.faults.fuzzing import (
    DIM,
    FUTURE_SKEW_MS,
    LIMITS,
    MAX_AGE_DAYS,
    TOPICS,
    Message,
    payloads,
    verdict,
)
from tests.faults.kit import CLIENT, Reader, Worker

N = 10_000  # Hypothesis payloads per topic
BURST = 250  # one user's events in one second: 2.5 times the default rate limit
NOW_MS = int(time.time() * 1000)
# Valid user-events, ctr-feedback labels and distinct catalog ads, as the worker counts them.
APPLIED = ("adpulse_events_total", "adpulse_feedback_labels_total", "adpulse_catalog_ads")
Position = tuple[str, int, int]  # topic, partition, offset


def burst(n: int) -> list[tuple[bytes | None, bytes, bool]]:
    """``n`` valid events of one user in one second: all beyond the limit are rate_limited."""
    return [
        (b"burst-u", json.dumps({"event_id": f"burst-e{i}", "user_id": "burst-u", "kind": "fav",
                                 "item_id": i, "category_id": 1, "ts": NOW_MS}).encode(), True)
        for i in range(n)
    ]  # fmt: skip


def rate_limited(
    events: dict[Position, bytes], stamps: dict[Position, int], limit: int
) -> set[Position]:
    """The reference: which valid user-events (by source position) the limiter refuses.

    Per user and second of broker time (the record's LogAppendTime, from the produce
    ack), the events beyond the first ``limit`` in arrival order. A group over the
    limit must sit on one partition, where arrival order is offset order.
    """
    groups: dict[tuple[str, int], list[Position]] = defaultdict(list)
    for where, value in events.items():
        event = json.loads(value)
        groups[(event["user_id"], stamps[where] // 1000)].append(where)
    out: set[Position] = set()
    for group in groups.values():
        if len(group) > limit:
            assert len({(t, p) for t, p, _ in group}) == 1, "a group over the limit is split"
            out.update(sorted(group)[limit:])
    return out


@functools.cache
def corpus(topic: str) -> list[tuple[bytes | None, bytes, bool]]:
    """(key, value, must be applied) per message, drawn once per session."""
    return [(k, v, verdict(topic, k, v, NOW_MS)) for k, v in payloads(topic, N, NOW_MS)]


def engine_accepts(topic: str, key: bytes | None, value: bytes) -> bool:
    raw = Raw(value, key, 0, 0)
    if topic == "user-events":
        good, _ = decode_events([raw], NOW_MS, LIMITS[topic], FUTURE_SKEW_MS, MAX_AGE_DAYS)
        return bool(good)
    if topic == "ad-requests":
        req = request_decoder(LIMITS[topic]).decode(raw)
        return not isinstance(req, Rejected) and not split_by_key([(req, raw)])[1]
    if topic == "ctr-feedback":
        return not isinstance(feedback_decoder().decode(raw), Rejected)
    return check_catalog_record(key, value, DIM) is None


@pytest.mark.parametrize("topic", TOPICS)
def test_decoders_agree_with_the_schema_on_every_fuzzed_payload(topic: str) -> None:
    messages = corpus(topic)
    assert len(messages) >= N
    wrong = [(k, v[:200], ok) for k, v, ok in messages if engine_accepts(topic, k, v) != ok]
    assert not wrong, f"{len(wrong)} verdicts differ from the schema's, e.g. {wrong[:3]}"
    # Both verdicts occur, and every kind of payload the generator promises was drawn.
    assert 0 < sum(ok for *_, ok in messages) < len(messages)
    values = [v for _, v, _ in messages]
    assert any(len(v) > LIMITS[topic] for v in values)
    assert any(b"[" * 1000 in v for v in values) and any(b'{"a":' * 1000 in v for v in values)
    assert any(b"\\ud8" in v or b"\xed\xa0" in v for v in values)
    assert any(b"NaN" in v or b"Infinity" in v for v in values)


def produce(
    settings: Settings, topic: str, messages: list[Message]
) -> list[tuple[int, int, int]]:
    """Send in order; (partition, offset, record timestamp) of each, from the acks."""
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap, client_id=CLIENT, linger_ms=5, acks=1,
        max_request_size=1_048_576, batch_size=256 * 1024,
    )  # fmt: skip
    name = settings.topic(topic)
    # Keyed messages go where the default partitioner puts them, as the contract says: a
    # compacted catalog keeps one record per key only if a key always lands on one partition.
    futures = [
        producer.send(name, key=k, value=v, partition=None if k else i % settings.partitions)
        for i, (k, v) in enumerate(messages)
    ]
    producer.flush()
    acks = (f.get(timeout=60) for f in futures)  # bench-ok: a wait bound
    where = [(m.partition, m.offset, m.timestamp) for m in acks]
    producer.close()
    return where


def broker_refuses(settings: Settings, topic: str, value: bytes) -> bool:
    """Whether the broker answers a single keyless record with InvalidRecordError."""
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, client_id=CLIENT, retries=0)
    try:
        producer.send(settings.topic(topic), key=None, value=value, partition=0).get(30)
    except KafkaError as exc:
        return "InvalidRecord" in type(exc).__name__ or "invalid" in str(exc).lower()
    finally:
        producer.close()
    return False


@pytest.mark.integration
def test_worker_applies_valid_and_dead_letters_each_invalid_message_once(
    settings: Settings, tmp_path: Path
) -> None:
    create_topics(settings)
    worker = Worker(settings, tmp_path, {})  # production settings: the rate limiter on
    limit = settings.max_events_per_user_s
    events: dict[Position, bytes] = {}  # valid user-events by source position
    stamps: dict[Position, int] = {}  # their broker timestamps (LogAppendTime)
    try:
        starting = threading.Thread(target=worker.start)
        starting.start()  # the worker starts while the corpus is drawn
        sent: dict[str, list[tuple[bytes | None, bytes, bool]]] = {}
        where: dict[tuple[str, int, int], bytes] = {}  # invalid messages by source position
        for topic in TOPICS:
            sent[topic] = corpus(topic)
            if topic == "ad-catalog" and settings.embedded == "kafka":
                # Apache Kafka refuses keyless records on a compacted topic (and with them the
                # rest of their batch): they never reach the worker, so none is dead-lettered.
                keyless = [(k, v, ok) for k, v, ok in sent[topic] if k is None]
                assert keyless and not any(ok for *_, ok in keyless)
                assert broker_refuses(settings, topic, keyless[0][1])
                sent[topic] = [m for m in sent[topic] if m[0] is not None]
            if topic == "user-events":  # one user's burst, in the middle of the others
                half = len(sent[topic]) // 2
                sent[topic] = [*sent[topic][:half], *burst(BURST), *sent[topic][half:]]
            acks = produce(settings, topic, [(k, v) for k, v, _ in sent[topic]])
            for (part, off, stamp), (_, v, ok) in zip(acks, sent[topic], strict=True):
                if not ok:
                    where[(settings.topic(topic), part, off)] = v
                elif topic == "user-events":
                    events[(settings.topic(topic), part, off)] = v
                    stamps[(settings.topic(topic), part, off)] = stamp
        starting.join()
        # Stamped NOW_MS, no later than any fuzzed event: a newer second would let the limiter
        # forget the burst's second while part of the burst waits on its partition.
        sentinel = {"event_id": "sentinel", "user_id": "sentinel", "kind": "fav", "item_id": 1,
                    "category_id": 1, "ts": NOW_MS}  # fmt: skip
        produce(settings, "user-events", [(b"sentinel", json.dumps(sentinel).encode())])
    except BaseException:
        worker.stop()  # a failure while feeding must not leave the worker running
        raise
    limited = rate_limited(events, stamps, limit)
    # The reference counts by the broker's stamps: BURST - limit when the burst lands within
    # one second, fewer when a loaded box spreads it over two (93 of 150 once). The worker is
    # held to that count below, so only "some went over" is asked of the set-up here.
    bursts = {v for _, v, _ in burst(BURST)}
    assert limited and {events[at] for at in limited} <= bursts, "only the burst goes over"
    where.update({at: events[at] for at in limited})  # dead letters too, as rate_limited
    dead, decisions = Reader(settings, "dead-letters"), Reader(settings, "ad-decisions")
    try:
        worker.wait_until(lambda: worker.interest("sentinel") is not None, 120, "the sentinel")
        dead.until(lambda: len(dead.records) >= len(where), 120, f"{len(where)} dead letters")
        valid = {t: [(k, v) for k, v, ok in sent[t] if ok] for t in TOPICS}
        decisions.until(lambda: len(decisions.records) >= len(valid["ad-requests"]), 60,
                        "a decision per valid request")  # fmt: skip

        latest = {json.loads(v)["ad_id"]: json.loads(v) for _, v in valid["ad-catalog"]}
        want_ads = sum(bool(a.get("active", True)) for a in latest.values())  # paused: not served
        applied = len(valid["user-events"]) - len(limited) + 1  # the sentinel's too
        want = (applied, len(valid["ctr-feedback"]), want_ads)
        seen: list[tuple[float, ...]] = []

        def settled() -> bool:
            seen.append(tuple(worker.metric(m) for m in APPLIED))
            return seen[-1] == want

        try:
            worker.wait_until(settled, 60, "every valid message applied")
        except AssertionError:
            pytest.fail(f"{APPLIED}: expected {want}, the worker counts {seen[-1]}")
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # bench-ok: a settle wait, for extra records
            dead.poll()
            decisions.poll()
        assert worker.health() == 200

        letters = [json.loads(r.value) for r in dead.records]
        counts = Counter((d["topic"], d["partition"], d["offset"]) for d in letters)
        assert set(counts) == set(where), "dead letters differ from the invalid messages"
        assert set(counts.values()) == {1}, "a message was dead-lettered twice"
        for d in letters:
            at = (d["topic"], d["partition"], d["offset"])
            assert base64.b64decode(d["payload_b64"]) == where[at][:MAX_KEPT_BYTES]
            assert d["error"] and d["message"]
            assert (d["error"] == "rate_limited") == (at in limited), d
        too_large = Counter(d["topic"] for d in letters if d["error"] == "too_large")
        assert set(too_large) == {settings.topic(t) for t in TOPICS}

        by_request = Counter(json.loads(r.value)["request_id"] for r in decisions.records)
        wanted = Counter(json.loads(v)["request_id"] for _, v in valid["ad-requests"])
        assert by_request == wanted
        # The known-valid records (unique ids, users and ads no other message uses) took
        # effect, each exactly once; so did the burst's first events, up to the limit in each
        # second of broker time the burst landed in (the reference's count: the limit itself
        # within one second; a burst over a second's boundary keeps more, 128 of 250 once).
        oks = Counter(f"ok-u{i % 50}" for i in range(0, N, 20))
        for user, n in oks.items():
            body = worker.interest(user)
            assert body is not None and sum(body["counts"].values()) == n
        body = worker.interest("burst-u")
        assert body is not None and sum(body["counts"].values()) == BURST - len(limited)
        assert BURST - len(limited) >= limit
        shows = Counter(f"ok-ad{i % 5}" for i in range(0, N, 20))
        for ad_id, n in shows.items():
            assert worker.get(f"/ads/{ad_id}/strategy")[1]["shows"] == n
    finally:
        dead.close()
        decisions.close()
        worker.stop()
