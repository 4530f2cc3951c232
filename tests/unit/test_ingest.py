"""The fast user-events decoder agrees with the JSON Schema, and says why it rejects."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adpulse.core.settings import Settings
from schemas import examples, validator
from streams.ingest import REASONS, Raw, decode_events, to_columns

NOW = 1_700_000_000_000
VALID, INVALID = examples("user-events")


def key_of(payload: bytes | None) -> bytes | None:
    """The key a correct producer gives: the body's user_id (b"k" where there is none)."""
    try:
        user = json.loads(payload or b"").get("user_id")
    except (ValueError, AttributeError):
        user = None
    return user.encode() if isinstance(user, str) else b"k"


def decode(
    payloads: list[bytes | None], keys: list[bytes | None] | None = None, max_age_days: int = 0
) -> tuple[list[Any], list[Any]]:
    keys = [key_of(p) for p in payloads] if keys is None else keys
    raws = [Raw(p, k, 0, i) for i, (p, k) in enumerate(zip(payloads, keys, strict=True))]
    return decode_events(raws, NOW, 8192, 300_000, max_age_days)


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


def test_an_event_keyed_by_another_user_or_by_none_is_a_key_mismatch() -> None:
    """The key picks the partition, the body the state: both must name the same user, or
    the user's state would be written on a partition that is not theirs."""
    victim = json.dumps({**VALID[0], "user_id": "victim"}).encode()
    good, bad = decode([victim, victim, victim, victim], [b"attacker", None, b"", b"victim"])
    assert [raw.offset for _, raw in good] == [3]
    assert [(r.reason, r.raw.offset) for r in bad] == [("key_mismatch", i) for i in range(3)]
    assert "no key" in bad[1].message and "key_mismatch" in REASONS


def test_the_accepted_event_time_range_ends_at_the_horizon_each_way() -> None:
    day = 86_400_000
    cases = {"1970": 0, "seconds-for-ms": 1_700_000_000, "past-horizon": NOW - 30 * day - 1,
             "at-horizon": NOW - 30 * day, "now": NOW, "skew-limit": NOW + 300_000,
             "future": NOW + 300_001}  # fmt: skip
    payloads = [json.dumps({**VALID[0], "event_id": k, "ts": t}).encode() for k, t in cases.items()]
    good, bad = decode(payloads, max_age_days=30)
    assert [ev.event_id for ev, _ in good] == ["at-horizon", "now", "skew-limit"]
    reasons = {json.loads(r.raw.value or b"")["event_id"]: r.reason for r in bad}
    assert reasons == {"1970": "too_old", "seconds-for-ms": "too_old",
                       "past-horizon": "too_old", "future": "future_ts"}  # fmt: skip
    assert "30 days" in bad[0].message


def test_the_default_horizon_refuses_1970_and_admits_the_2017_sample() -> None:
    days = Settings().max_event_age_days
    taobao_2017 = 1_511_539_200_000  # 2017-11-25, the sample's first day
    for now in (NOW, 1_830_000_000_000):  # 2023 and 2027-12
        payloads = [json.dumps({**VALID[0], "ts": ts}).encode() for ts in (0, taobao_2017)]
        raws = [Raw(p, VALID[0]["user_id"].encode(), 0, i) for i, p in enumerate(payloads)]
        good, bad = decode_events(raws, now, 8192, 300_000, days)
        assert [ev.ts for ev, _ in good] == [taobao_2017]
        assert [r.reason for r in bad] == ["too_old"]
