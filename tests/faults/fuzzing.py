"""Hostile payloads for every input topic, drawn by Hypothesis, and the verdict each deserves.

``payloads(topic, n)`` draws ``n`` messages deterministically (derandomized, no
example database): random bytes, arbitrary JSON, and valid records broken one
field at a time (wrong types, huge strings, deep nesting, NaN/Infinity tokens,
extreme numbers and timestamps, lone surrogates, NUL, right-to-left marks,
invalid UTF-8, truncation, oversize), with known-valid records mixed in.

``verdict(topic, key, value, now_ms)`` is the reference: the JSON Schema
(``schemas.first_error``) over a strict reading of the bytes, plus the size and
clock limits the engine documents (a catalog record's key is its ad id, its
embedding has the model's dimension; an item-catalog record's key is its item id,
which fits an int64; a user-events or ad-requests record's key is its raw user id).
It shares no code with the decoders.
"""

from __future__ import annotations

import functools
import json
import random
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas import examples, first_error

LIMITS = {"user-events": 8192, "ad-requests": 8192, "ctr-feedback": 65536, "ad-catalog": 65536,
          "item-catalog": 16384}  # fmt: skip
FUTURE_SKEW_MS = 300_000  # ADPULSE_MAX_FUTURE_SKEW_MS default (user-events only)
MAX_AGE_DAYS = 7305  # ADPULSE_MAX_EVENT_AGE_DAYS default (user-events only)
DIM = 64  # ADPULSE_DIM default: a catalog embedding must have it
# The topics tests/faults/test_fuzz.py sends to one worker; item-catalog is read only by a
# worker with a text encoder, so tests/faults/test_fuzz_items.py covers it with one.
TOPICS = ("user-events", "ad-requests", "ctr-feedback", "ad-catalog")
INT64_MAX = 2**63 - 1
Message = tuple[bytes | None, bytes]  # key, value

EDGE_STRINGS = [
    "", "\x00", "a\x00b", "\u202eevil\u202c", "\u200f", "\ufeff", "\ud800", "\udfff", "x\ud83d",
    "\U0001f600", "e\u0301", " ", "\n", "home\n", "HOME", "null", "A" * 129, "\u0000" * 64,
    "\\u0000", "ok-u1",
]  # fmt: skip
EDGE_NUMBERS: list[Any] = [
    -1, 0, 1, -0.0, 0.5, 1.0, 23, 24, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63),
    253_402_300_799_999, 253_402_300_800_000, 1e308, -1e308, 5e-324, True, False, None,
]  # fmt: skip
RAW_TOKENS = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "01", "1.", ".5", "+1", "0x10", "1e-400",
    "-0", "1E3", "[", "}", '"\\ud800"', '"\\udc00x"', '"\\u0000"',
]  # fmt: skip


def valid_record(topic: str, i: int, now_ms: int, tag: str = "ok") -> dict[str, Any]:
    """A valid record with ids unique to ``i`` (and ``tag``)."""
    user = f"{tag}-u{i % 50}"
    if topic == "user-events":
        rec: dict[str, Any] = {
            "event_id": f"{tag}-e{i}", "user_id": user, "item_id": 1000 + i,
            "kind": ("browse", "click", "cart", "fav", "purchase")[i % 5],
            "category_id": 1 + i % 7, "ts": now_ms - 1000 * (i % 3600),
        }  # fmt: skip
        if i % 5 == 1:
            rec.update(ad_id=f"{tag}-a{i % 5}", decision_id=f"{tag}-d{i}")
        return rec
    if topic == "ad-requests":
        rec = {"request_id": f"{tag}-r{i}", "user_id": user, "placement": "fz", "ts": now_ms}
        if i % 3 == 0:
            rec["candidates"] = [f"{tag}-ad{i % 7}"]
        return rec
    if topic == "forget-requests":
        rec = {"request_id": f"{tag}-f{i}", "user_id": f"{tag}-gone{i % 50}", "ts": now_ms}
        if i % 2:
            rec["reason"] = f"ticket {i}"
        return rec
    if topic == "ctr-feedback":
        features = {"interest": [0.0, 0.5, -0.25, 0.125][: i % 5], "placement": "fz", "pctr": 0.02}
        return {"decision_id": f"{tag}-d{i}", "ad_id": f"{tag}-ad{i % 5}", "user_id": user,
                "clicked": i % 2, "decision_ts": now_ms - 5000, "label_ts": now_ms,
                "features": features, "propensity": 0.5, "policy": "greedy"}  # fmt: skip
    if topic == "item-catalog":  # ids by tag: ok 1,000,000 + i, mut 2,000,000 + i, ...
        rec = {"item_id": str(item_id(tag, i)), "title": f"{tag} item {i}: trail running shoes",
               "category_id": 1 + i % 7}  # fmt: skip
        if i % 3 == 0:
            rec["price"] = 10.0 + i
        return rec
    return {"ad_id": f"{tag}-ad{i}", "campaign_id": f"{tag}-c{i % 3}", "category_id": 1 + i % 7,
            "bid": 1.0 + i % 4, "daily_budget": 100.0,
            "targeting": {"placements": ["fz"]}}  # fmt: skip


def item_id(tag: str, i: int) -> int:
    """The item id of ``valid_record("item-catalog", i, tag=tag)``: disjoint per tag."""
    return {"ok": 1, "mut": 2, "big": 3}.get(tag, 9) * 1_000_000 + i


def key_for(topic: str, record: Any) -> bytes | None:
    field = {"user-events": "user_id", "ad-requests": "user_id", "ctr-feedback": "ad_id",
             "ad-catalog": "ad_id", "forget-requests": "user_id",
             "item-catalog": "item_id"}[topic]  # fmt: skip
    value = record.get(field) if isinstance(record, dict) else None
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else None


def _paths(record: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for k, v in record.items():
        out.append((k,))
        if isinstance(v, dict):
            out.extend((k, k2) for k2 in v)
    return out


# -- strategies ---------------------------------------------------------------------------------
# One draw per decision (Hypothesis spends ~30 us a draw): edits come from tables built once.
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.text(max_size=20), st.sampled_from(EDGE_STRINGS)),
    lambda kids: st.lists(kids, max_size=3)
    | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=6,
)  # fmt: skip
_HUGE = [128, 129, 3000, 9000] * 50 + [70_000, 70_000, 300_000]  # rarely far past the limits
_DEEP = [10, 200, 999, 1001, 1200, 3000] * 20 + [30_000]
_CUTS = [None] * 6 + ["truncate", "flip", "bom", "tail"]
_SERIALIZE = [(ascii_only, cut) for ascii_only in (True, False) for cut in _CUTS]
# Each edit kind is drawn first from a short list (Hypothesis favours early elements of long
# ones), then its value: so every kind shows up in every corpus.
_KINDS = ["drop", "string", "number", "token", "huge", "deep-list", "deep-dict", "list", "json"]
_LISTS = [[v] * n for v in (0.5, "a", None, [], {}) for n in (0, 1, 1025)]
_KIND_ST, _STRING_ST, _NUMBER_ST, _TOKEN_ST, _HUGE_ST, _DEEP_ST, _LIST_ST, _SERIALIZE_ST = map(
    st.sampled_from,
    (_KINDS, EDGE_STRINGS, EDGE_NUMBERS, RAW_TOKENS, _HUGE, _DEEP, _LISTS, _SERIALIZE),
)


@functools.cache
def _path_st(topic: str, now_ms: int) -> st.SearchStrategy[tuple[str, ...]]:
    """One strategy object per topic: Hypothesis hashes a sampled_from's elements per instance."""
    base = valid_record(topic, 1, now_ms, tag="mut")
    return st.sampled_from([*_paths(base), ("extra",), ("features", "x")])


def _edit(draw: st.DrawFn) -> tuple[str, Any]:
    """("drop", None), ("value", a Python value) or ("raw", JSON text spliced in)."""
    kind = draw(_KIND_ST)
    if kind == "drop":
        return kind, None
    if kind == "string":
        return "value", draw(_STRING_ST)
    if kind == "number":
        return "value", draw(_NUMBER_ST)
    if kind == "token":
        return "raw", draw(_TOKEN_ST)
    if kind == "huge":
        return "value", "x" * draw(_HUGE_ST)
    if kind == "deep-list":
        d = draw(_DEEP_ST)
        return "raw", "[" * d + "]" * d
    if kind == "deep-dict":
        d = draw(_DEEP_ST)
        return "raw", '{"a":' * d + "1" + "}" * d
    if kind == "list":
        return "value", draw(_LIST_ST)
    return "value", draw(_json)


@st.composite
def _mutated(draw: st.DrawFn, topic: str, now_ms: int) -> bytes:
    """A valid record with one to three fields broken, serialized one of several ways."""
    base = valid_record(topic, draw(st.integers(0, 400)), now_ms, tag="mut")
    raw: dict[str, str] = {}  # placeholder -> raw JSON text spliced in after json.dumps
    paths = _path_st(topic, now_ms)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(paths)
        kind, value = _edit(draw)
        parent: Any = base
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if kind == "drop":
            parent.pop(path[-1], None)
        elif kind == "raw":
            marker = f"__raw{len(raw)}__"
            raw[marker] = value
            parent[path[-1]] = marker
        else:
            parent[path[-1]] = value
    ascii_only, cut = draw(_SERIALIZE_ST)
    text = json.dumps(base, ensure_ascii=ascii_only, allow_nan=True)
    for marker, fragment in raw.items():
        text = text.replace(f'"{marker}"', fragment)
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates as (invalid) UTF-8 bytes
    if cut in ("truncate", "flip") and data:
        i = draw(st.integers(0, len(data) - 1))
        flipped = bytes([data[i] ^ (1 + i % 255)])
        data = data[:i] if cut == "truncate" else data[:i] + flipped + data[i + 1 :]
    elif cut == "bom":
        data = b"\xef\xbb\xbf" + data
    elif cut == "tail":
        data += (b" ", b"\n", b"x", b"{}", b"\x00")[len(data) % 5]
    return data


def _strategy(topic: str, now_ms: int) -> st.SearchStrategy[bytes]:
    dumped = _json.map(lambda v: json.dumps(v, allow_nan=True).encode("utf-8", "surrogatepass"))
    mutated = _mutated(topic, now_ms)
    return st.one_of(st.binary(max_size=64), dumped, mutated, mutated, mutated, mutated)


def payloads(topic: str, n: int, now_ms: int, seed: int = 0) -> list[Message]:
    """``n`` Hypothesis-drawn payloads, with a known-valid record after every 20th, the
    schema's own examples at the end, and a valid record at and past the size limit."""
    drawn: list[bytes] = []
    per_example = 25

    @settings(
        max_examples=n // per_example + 50, derandomize=True, database=None, deadline=None,
        phases=[Phase.generate], suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(st.lists(_strategy(topic, now_ms), min_size=per_example, max_size=per_example))
    def draw_into(batch: list[bytes]) -> None:
        drawn.extend(batch)

    draw_into()
    assert len(drawn) >= n, f"Hypothesis drew only {len(drawn)} payloads for {topic}"
    rng = random.Random(seed)
    out: list[Message] = []
    for i, value in enumerate(drawn[:n]):
        if i % 20 == 0:  # and a known-valid record, its ids unique
            rec = valid_record(topic, i, now_ms)
            out.append((key_for(topic, rec), json.dumps(rec).encode()))
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            parsed = None
        key = key_for(topic, parsed) if rng.random() < 0.9 else rng.randbytes(rng.randrange(0, 9))
        out.append((key, value))
    valid, invalid = examples(topic)
    out.extend((key_for(topic, ex), json.dumps(ex).encode()) for ex in valid)
    out.extend((key_for(topic, ex), json.dumps(ex).encode()) for _, ex in invalid)
    out.extend(_at_the_limit(topic, now_ms))
    return out


def _at_the_limit(topic: str, now_ms: int) -> list[Message]:
    """A valid record padded with trailing whitespace to exactly the size limit, and one
    byte past it: no drawn payload is valid but too large, so the limit alone decides."""
    rec = valid_record(topic, 0, now_ms, tag="big")
    data, key = json.dumps(rec).encode(), key_for(topic, rec)
    return [(key, data.ljust(LIMITS.get(topic, 8192) + extra)) for extra in (0, 1)]


# -- the reference verdict --------------------------------------------------------------------
def _strict_json(value: bytes) -> tuple[Any, bool]:
    try:
        text = value.decode("utf-8")  # strict: surrogates and bad bytes refused here
    except UnicodeDecodeError:
        return None, False
    text = text.removeprefix("\ufeff")  # RFC 8259 8.1: a parser may ignore a leading BOM

    def no_constant(name: str) -> Any:
        raise ValueError(name)

    try:
        data = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError):
        return None, False
    stack = [data]
    while stack:  # lone surrogates spelled as \\ud800 escapes: not Unicode (RFC 7493 2.1)
        item = stack.pop()
        if isinstance(item, str):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in item):
                return None, False
        elif isinstance(item, dict):
            stack.extend([*item.keys(), *item.values()])
        elif isinstance(item, list):
            stack.extend(item)
    return data, True


def verdict(topic: str, key: bytes | None, value: bytes, now_ms: int) -> bool:
    """True when the engine must apply the message, False when it must dead-letter it."""
    if len(value) > LIMITS[topic]:
        return False
    data, ok = _strict_json(value)
    if not ok:
        return False
    try:
        if first_error(topic, data) is not None:
            return False
    except RecursionError:
        return False
    if topic == "user-events" and data["ts"] > now_ms + FUTURE_SKEW_MS:
        return False
    if topic == "user-events" and data["ts"] < now_ms - MAX_AGE_DAYS * 86_400_000:
        return False
    if topic in ("user-events", "ad-requests") and key != data["user_id"].encode():
        return False
    if topic == "ad-catalog":
        dim_ok = "embedding" not in data or len(data["embedding"]) == DIM
        return key == data["ad_id"].encode() and dim_ok
    if topic == "item-catalog":  # the id must also fit user-events' int64 item_id
        return key == data["item_id"].encode() and int(data["item_id"]) <= INT64_MAX
    return True


def contract_verdict(topic: str, value: bytes, limit: int = 8192) -> bool:
    """The reference for a body with no key and no clock rule (a forget request, the body
    of ``POST /decide``): at most ``limit`` bytes, strict JSON, valid by the schema."""
    if len(value) > limit:
        return False
    data, ok = _strict_json(value)
    if not ok:
        return False
    try:
        return first_error(topic, data) is None
    except RecursionError:
        return False
