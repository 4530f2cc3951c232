"""Fuzzed forget-requests: each one confirmed or dead-lettered exactly once, never a crash.

A forget request deletes a user's state, so a hostile one must neither crash the
worker nor vanish: 10,000 Hypothesis-drawn payloads (tests/faults/fuzzing.py) plus
known-valid requests go through the real broker to one worker with production
settings. Each valid one must be confirmed on forget-confirmations (once per
message, on its partition), each invalid one dead-lettered once with its bytes
and a reason, and a sentinel request sent last must be confirmed too. In process,
the decoder's verdict must equal the reference verdict for every payload.
"""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from adpulse.core.settings import Settings
from schemas import first_error
from streams.deadletter import MAX_KEPT_BYTES, Raw, Rejected
from streams.forget import _decoder as forget_decoder
from streams.runtime.topicadmin import create_topics
from streams.validate import key_problem
from tests.faults.fuzzing import contract_verdict, payloads
from tests.faults.kit import Reader, Worker
from tests.faults.test_fuzz import produce

TOPIC = "forget-requests"
N = 10_000
NOW_MS = int(time.time() * 1000)
# The users the known-valid requests forget first (every 20th message, i % 50), by the
# request that must find their state; each gets one event before the requests are sent.
SEEDED = {f"ok-gone{i % 50}": f"ok-f{i}" for i in range(0, 100, 20)}


@functools.cache
def corpus() -> list[tuple[bytes | None, bytes, bool]]:
    """(key, value, must be applied) per message, drawn once per session: valid by the
    contract and keyed by its raw user id (else key_mismatch)."""
    return [(k, v, contract_verdict(TOPIC, v) and _keyed_right(k, v))
            for k, v in payloads(TOPIC, N, NOW_MS)]  # fmt: skip


def _keyed_right(key: bytes | None, value: bytes) -> bool:
    return key_problem(key, str(json.loads(value)["user_id"])) is None


def _engine_accepts(key: bytes | None, value: bytes) -> bool:
    req = forget_decoder.decode(Raw(value, key, 0, 0))
    return not isinstance(req, Rejected) and key_problem(key, req.user_id) is None


def test_forget_decoder_agrees_with_the_schema_on_every_fuzzed_payload() -> None:
    messages = corpus()
    assert len(messages) >= N
    wrong = [
        (k, v[:200], ok)
        for k, v, ok in messages
        if _engine_accepts(k, v) != ok
    ]
    assert not wrong, f"{len(wrong)} verdicts differ from the schema's, e.g. {wrong[:3]}"
    assert 0 < sum(ok for *_, ok in messages) < len(messages)
    values = [v for _, v, _ in messages]
    assert any(len(v) > 8192 for v in values)
    assert any(ok and len(v) == 8192 for _, v, ok in messages)  # the limit itself is allowed
    assert any(b"[" * 1000 in v for v in values) and any(b'{"a":' * 1000 in v for v in values)
    assert any(b"\\ud8" in v or b"\xed\xa0" in v for v in values)
    assert any(b"NaN" in v or b"Infinity" in v for v in values)


def seed_state(settings: Settings, worker: Worker) -> None:
    """One event for each seeded user, applied before any forget request is sent."""
    events = []
    for n, user in enumerate(SEEDED):
        rec = {"event_id": f"seed-e{n}", "user_id": user, "item_id": 1, "kind": "fav",
               "category_id": 1, "ts": NOW_MS}  # fmt: skip
        events.append((user.encode(), json.dumps(rec).encode()))
    produce(settings, "user-events", events)
    worker.wait_until(lambda: all(worker.interest(u) for u in SEEDED), 60, "the seeded users")


@pytest.mark.integration
def test_worker_confirms_each_valid_forget_request_and_dead_letters_each_invalid_one_once(
    settings: Settings, tmp_path: Path
) -> None:
    create_topics(settings)
    worker = Worker(settings, tmp_path, {})  # production settings: the rate limiter on
    try:
        starting = threading.Thread(target=worker.start)
        starting.start()  # the worker starts while the corpus is drawn
        sent = corpus()
        starting.join()
        seed_state(settings, worker)
        started = time.monotonic()
        acks = produce(settings, TOPIC, [(k, v) for k, v, _ in sent])
        sentinel = {"request_id": "sentinel", "user_id": "sentinel", "ts": NOW_MS}
        [sentinel_at] = produce(settings, TOPIC, [(b"sentinel", json.dumps(sentinel).encode())])
    except BaseException:
        worker.stop()  # a failure while feeding must not leave the worker running
        raise
    placed = list(zip(acks, sent, strict=True))
    where = {(settings.topic(TOPIC), p, o): v for (p, o, _), (_, v, ok) in placed if not ok}
    # What each valid message must produce: a confirmation with its request id, on its partition.
    wanted = Counter((json.loads(v)["request_id"], p) for (p, *_), (_, v, ok) in placed if ok)
    wanted[("sentinel", sentinel_at[0])] += 1
    dead, confirmed = Reader(settings, "dead-letters"), Reader(settings, "forget-confirmations")
    try:
        confirmed.until(lambda: any(r.key == b"sentinel" for r in confirmed.records), 120,
                        "the sentinel's confirmation")  # fmt: skip
        dead.until(lambda: len(dead.records) >= len(where), 120, f"{len(where)} dead letters")
        total = sum(wanted.values())
        confirmed.until(lambda: len(confirmed.records) >= total, 120, f"{total} confirmations")
        elapsed = time.monotonic() - started
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # bench-ok: a settle wait, for extra records
            dead.poll()
            confirmed.poll()
        assert worker.health() == 200
        print(f"\n{len(sent)} forget-requests: {total} confirmed, {len(where)} dead-lettered, "
              f"{elapsed:.1f}s from the first send to the last record")  # fmt: skip

        letters = [json.loads(r.value) for r in dead.records]
        counts = Counter((d["topic"], d["partition"], d["offset"]) for d in letters)
        assert set(counts) == set(where), "dead letters differ from the invalid messages"
        assert set(counts.values()) == {1}, "a message was dead-lettered twice"
        for d in letters:
            original = where[(d["topic"], d["partition"], d["offset"])]
            assert base64.b64decode(d["payload_b64"]) == original[:MAX_KEPT_BYTES]
            assert d["error"] and d["message"] and "\n" not in d["message"]
            assert d["stage"] == "forget"
        assert {"too_large", "invalid_json", "schema"} <= {d["error"] for d in letters}

        confirmations = [json.loads(r.value) for r in confirmed.records]
        for c, r in zip(confirmations, confirmed.records, strict=True):
            assert first_error("forget-confirmations", c) is None, c
            assert r.key == c["request_id"].encode() and r.partition == c["partition"]
        got = Counter((c["request_id"], c["partition"]) for c in confirmations)
        assert got == wanted, f"confirmations differ: {(got - wanted) + (wanted - got)}"
        assert worker.metric("adpulse_forget_requests_total") == total
        # The first request for each seeded user found its state and deleted it.
        first = {c["request_id"]: c for c in confirmations if c["request_id"] in SEEDED.values()}
        assert all(first[req]["interest"] == 1 for req in SEEDED.values())
        assert not any(worker.interest(u) for u in SEEDED)
        assert "Traceback" not in worker.log_path.read_text(errors="replace")
    finally:
        dead.close()
        confirmed.close()
        worker.stop()
