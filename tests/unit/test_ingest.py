"""The fast user-events decoder agrees with the JSON Schema, and says why it rejects."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import examples, validator
from streams.ingest import Raw, decode_events, to_columns

NOW = 1_700_000_000_000
VALID, INVALID = examples("user-events")


def decode(payloads: list[bytes | None]) -> tuple[list[Any], list[Any]]:
    raws = [Raw(p, b"k", 0, i) for i, p in enumerate(payloads)]
    return decode_events(raws, now_ms=NOW, max_bytes=8192, max_skew_ms=300_000)


@pytest.mark.parametrize("payload", VALID, ids=lambda p: p["event_id"])
def test_valid_examples_are_accepted(payload: dict[str, Any]) -> None:
    good, bad = decode([json.dumps(payload).encode()])
    assert bad == [] and len(good) == 1


@pytest.mark.parametrize(("name", "payload"), INVALID, ids=[n for n, _ in INVALID])
def test_invalid_examples_are_rejected_with_a_reason(name: str, payload: Any) -> None:
    good, bad = decode([json.dumps(payload).encode()])
    assert good == []
    assert bad[0].reason == "schema" and bad[0].message


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (None, "invalid_json"),
        (b"[]", "schema"),
        (
            b'{"event_id":"e","user_id":"u","kind":"browse","item_id":1,"category_id":2,"ts":NaN}',
            "invalid_json",
        ),
        (b" " * 9000, "too_large"),
        (json.dumps({**VALID[0], "ts": NOW + 3_600_000}).encode(), "future_ts"),
        (json.dumps({**VALID[0], "ad_id": "a1"}).encode(), "schema"),
    ],
)
def test_bad_input_gets_its_reason(raw: bytes | None, reason: str) -> None:
    good, bad = decode([raw])
    assert good == []
    assert bad[0].reason == reason


def test_integral_float_is_accepted_as_the_schema_does() -> None:
    payload = {**VALID[0], "ts": 1.7e12}
    assert validator("user-events").is_valid(payload)
    good, _ = decode([json.dumps(payload).encode()])
    assert good[0][0].ts == 1_700_000_000_000


def test_valid_events_interleaved_with_bad_are_all_kept_in_order() -> None:
    payloads: list[bytes | None] = []
    for i in range(50):
        payloads.append(json.dumps({**VALID[0], "event_id": f"ok{i}"}).encode())
        payloads.append(b'{"kind": 3}')
    good, bad = decode(payloads)
    assert [ev.event_id for ev, _ in good] == [f"ok{i}" for i in range(50)]
    assert [raw.offset for _, raw in good] == list(range(0, 100, 2))
    assert len(bad) == 50


def test_columns_index_users_in_first_seen_order() -> None:
    payloads = [
        json.dumps({**VALID[0], "user_id": u, "event_id": str(i)}).encode()
        for i, u in enumerate(["b", "a", "b"])
    ]
    good, _ = decode(payloads)
    users, batch = to_columns(good)
    assert users == ["b", "a"]
    assert batch.user.tolist() == [0, 1, 0]
    assert batch.offset.tolist() == [0, 1, 2]


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False),
    st.text(max_size=140),
    st.sampled_from(["browse", "click", "purchase", "view", ""]),
)
field_names = st.sampled_from(
    [
        "event_id",
        "user_id",
        "kind",
        "item_id",
        "category_id",
        "ts",
        "price",
        "ad_id",
        "decision_id",
        "x",
    ]
)


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    base = dict(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "drop"]))
        name = draw(field_names)
        if action == "set":
            base[name] = draw(json_leaf)
        else:
            base.pop(name, None)
    return base


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=near_valid())
def test_fast_path_accepts_exactly_what_the_schema_accepts(payload: dict[str, Any]) -> None:
    raw = json.dumps(payload).encode()
    good, bad = decode([raw])
    schema_ok = validator("user-events").is_valid(payload)
    if good:
        assert schema_ok, f"decoder accepted what the schema rejects: {payload}"
    elif bad[0].reason == "schema":
        assert not schema_ok, f"decoder rejected what the schema accepts: {payload}"
