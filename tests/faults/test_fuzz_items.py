"""Fuzzed item-catalog: each record applied or dead-lettered once, never a crash.

Item titles are read only by a worker with a text encoder (``ADPULSE_TEXT_MODEL``), so
this topic has its own worker, with the session's encoder. 10,000 Hypothesis-drawn
payloads (tests/faults/fuzzing.py) plus known-valid items and one item id above int64
go through the real broker. In process, the workers' check (:func:`check_item_record`)
must agree with the reference verdict on every payload. Through the worker, each
invalid record must come back exactly once on dead-letters (stage ``items``, with its
bytes and a reason), a schema-valid title the encoder cannot embed (only whitespace)
too, and every item with a valid record must be embedded: a user's events on items
count them by their title vectors (``items_embedded`` of the interest lookup), and
never items that had no valid record.
"""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from adpulse.core.settings import Settings
from streams.deadletter import MAX_KEPT_BYTES
from streams.items import check_item_record
from streams.runtime.topicadmin import create_topics
from tests.faults.fuzzing import INT64_MAX, LIMITS, item_id, payloads, verdict
from tests.faults.kit import Reader, Worker
from tests.faults.test_fuzz import broker_refuses, produce

TOPIC = "item-catalog"
N = 10_000
NOW_MS = int(time.time() * 1000)
# Valid by the schema (19 digits) but above user-events' int64 item_id: refused.
ABOVE_INT64 = (str(INT64_MAX + 1).encode(),
               json.dumps({"item_id": str(INT64_MAX + 1), "title": "too big an id",
                           "category_id": 1}).encode())  # fmt: skip
# A schema-valid title the encoder refuses (only whitespace). The draws follow NOW_MS, and
# some corpora held none (CI, 2026-12-03): so one is always sent.
BLANK_TITLE = (b"4000001", json.dumps({"item_id": "4000001", "title": " \n\t ",
                                       "category_id": 2}).encode())  # fmt: skip
SENTINELS = 16  # valid items sent after everything else, enough to land on every partition
CHECKED_OK = 30  # known-valid items a user's events refer to (with the sentinels <= item_limit)
CHECKED_REFUSED = 10  # ids with no valid record at all, referred to as well


@functools.cache
def corpus() -> list[tuple[bytes | None, bytes, bool]]:
    """(key, value, valid by the reference) per message, drawn once per session."""
    drawn = [*payloads(TOPIC, N, NOW_MS), ABOVE_INT64, BLANK_TITLE]
    return [(k, v, verdict(TOPIC, k, v, NOW_MS)) for k, v in drawn]


def embeddable(value: bytes) -> bool:
    """The encoder's own rule on a schema-valid title: not only whitespace. The other two
    cannot apply here: lone surrogates are refused by the strict reading already, and
    every valid title is short enough (checked below) for the 256-token limit."""
    return bool(json.loads(value)["title"].strip())


def test_item_check_agrees_with_the_schema_on_every_fuzzed_payload() -> None:
    messages = corpus()
    assert len(messages) >= N
    wrong = [(k, v[:200], ok) for k, v, ok in messages
             if (check_item_record(k, v) is None) != ok]  # fmt: skip
    assert not wrong, f"{len(wrong)} verdicts differ from the schema's, e.g. {wrong[:3]}"
    assert check_item_record(*ABOVE_INT64) == (
        "item_id_range", f"item_id {INT64_MAX + 1} is above {INT64_MAX}"
    )
    # Both verdicts occur, and every kind of payload the generator promises was drawn.
    assert 0 < sum(ok for *_, ok in messages) < len(messages)
    values = [v for _, v, _ in messages]
    assert any(len(v) > LIMITS[TOPIC] for v in values)
    assert any(ok and len(v) == LIMITS[TOPIC] for _, v, ok in messages)  # the limit is allowed
    assert any(b"[" * 1000 in v for v in values) and any(b'{"a":' * 1000 in v for v in values)
    assert any(b"\\ud8" in v or b"\xed\xa0" in v for v in values)
    assert any(b"NaN" in v or b"Infinity" in v for v in values)
    # Valid titles the text encoder must refuse are in the corpus (BLANK_TITLE at least: the
    # schema and the workers' check take it), and none is long enough to reach its 256
    # tokens (at most one WordPiece token a character, plus two).
    assert check_item_record(*BLANK_TITLE) is None
    valid_titles = [json.loads(v)["title"] for _, v, ok in messages if ok]
    assert any(not t.strip() for t in valid_titles)
    assert max(len(t) for t in valid_titles) <= 254


def interest_event(i: int, user: str, item: int) -> tuple[bytes, bytes]:
    rec = {"event_id": f"items-fz-e{i}", "user_id": user, "kind": "fav", "item_id": item,
           "category_id": 1, "ts": NOW_MS}  # fmt: skip
    return user.encode(), json.dumps(rec).encode()


@pytest.mark.integration
@pytest.mark.long
def test_worker_embeds_each_valid_item_and_dead_letters_each_invalid_one_once(
    settings: Settings, tmp_path: Path, text_model: Path
) -> None:
    create_topics(settings)
    extra = {"ADPULSE_TEXT_MODEL": str(text_model), "ADPULSE_DEVICE": "cpu"}
    worker = Worker(settings, tmp_path, extra)
    try:
        starting = threading.Thread(target=worker.start)
        starting.start()  # the worker starts while the corpus is drawn
        sent = corpus()
        if settings.embedded == "kafka":
            # Apache Kafka refuses keyless records on a compacted topic (and the rest of
            # their batch): they never reach the worker, so none is dead-lettered.
            keyless = [(k, v, ok) for k, v, ok in sent if k is None]
            assert keyless and not any(ok for *_, ok in keyless)
            assert broker_refuses(settings, TOPIC, keyless[0][1])
            sent = [m for m in sent if m[0] is not None]
        acks = produce(settings, TOPIC, [(k, v) for k, v, _ in sent])
        sentinels = []
        for n in range(SENTINELS):
            rec = {"item_id": str(item_id("sentinel", n)), "title": f"sentinel lamp {n}",
                   "category_id": 2}  # fmt: skip
            sentinels.append((rec["item_id"].encode(), json.dumps(rec).encode()))
        sentinel_acks = produce(settings, TOPIC, sentinels)
        starting.join()
    except BaseException:
        worker.stop()  # a failure while feeding must not leave the worker running
        raise
    assert {p for p, *_ in sentinel_acks} == set(range(settings.partitions))
    applies = [ok and embeddable(v) for _, v, ok in sent]
    placed = list(zip(acks, sent, applies, strict=True))
    where = {(settings.topic(TOPIC), p, o): v for (p, o, _), (_, v, _), a in placed if not a}
    # Ids with a record the worker applies (the latest valid one is the item), and ids all
    # of whose records it refuses: embedded, and never.
    by_id: dict[str, bool] = {}
    for (k, _, _), a in zip(sent, applies, strict=True):
        if k is not None:
            key = k.decode("utf-8", "replace")
            by_id[key] = by_id.get(key, False) or a
    checked_ok = [int(i) for i in sorted(by_id) if by_id[i]
                  and int(i) == item_id("ok", int(i) % 1_000_000)][:CHECKED_OK]  # fmt: skip
    # (canonical decimal only: "007" names no item the worker could find as item 7)
    checked_refused = [int(i) for i in sorted(by_id) if not by_id[i] and i.isdigit()
                       and str(int(i)) == i and int(i) <= INT64_MAX][:CHECKED_REFUSED]  # fmt: skip
    assert len(checked_ok) == CHECKED_OK and len(checked_refused) == CHECKED_REFUSED
    user = "items-fz-u"
    items = [int(k) for k, _ in sentinels] + checked_ok + checked_refused
    assert len(items) <= settings.item_limit  # the user's state keeps every one of them
    produce(settings, "user-events", [interest_event(i, user, it) for i, it in enumerate(items)])
    want = SENTINELS + CHECKED_OK
    dead = Reader(settings, "dead-letters")
    try:
        last: dict[str, Any] = {}

        def embedded() -> bool:
            last["body"] = worker.interest(user)
            return last["body"] is not None and last["body"]["items_embedded"] >= want

        worker.wait_until(embedded, 300, f"{want} items of the user embedded")
        dead.until(lambda: len(dead.records) >= len(where), 180, f"{len(where)} dead letters")
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # bench-ok: a settle wait, for extra records
            dead.poll()
        assert worker.health() == 200
        body = worker.interest(user)
        assert body is not None and body["items_embedded"] == want, body

        letters = [json.loads(r.value) for r in dead.records]
        counts = Counter((d["topic"], d["partition"], d["offset"]) for d in letters)
        assert set(counts) == set(where), "dead letters differ from the refused records"
        assert set(counts.values()) == {1}, "a record was dead-lettered twice"
        for d in letters:
            original = where[(d["topic"], d["partition"], d["offset"])]
            assert base64.b64decode(d["payload_b64"]) == original[:MAX_KEPT_BYTES]
            assert d["error"] and d["message"] and "\n" not in d["message"]
            assert d["stage"] == "items"
        assert {"too_large", "invalid_json", "schema", "key_mismatch", "item_id_range",
                "text_empty"} <= {d["error"] for d in letters}  # fmt: skip
    finally:
        dead.close()
        worker.stop()
