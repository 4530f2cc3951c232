"""Each topic's Struct (schemas/messages.py) and its JSON Schema are one contract.

Checked three ways: the Struct has the schema's fields and required set; both
accept every valid example (and the Struct writes it back unchanged: optional
fields absent, never null) and refuse every invalid one; and both agree on
payloads Hypothesis draws from the schema itself, valid ones and valid ones
broken at one place. "The Struct" is the decode function every stage uses
(``streams.validate.ContractDecoder``): msgspec, then what msgspec cannot say
(``schemas.messages.extra_check``), then the schema for what msgspec refused. Its
fast part alone is held to more: whatever it accepts the schema accepts, and
what it refuses but the schema accepts is only ever an integral float where an
integer goes (``1.0``), which the slow part accepts.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import types
from typing import Any, Union, get_args, get_origin

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import examples, first_error, load_schema
from schemas.messages import MESSAGES, AdDecision, extra_check
from streams.deadletter import Raw, Rejected
from streams.validate import ContractDecoder

TOPICS = sorted(MESSAGES)
BIG = 1 << 20  # no size limit here: the stages' limits are theirs, not the contract's
PROPERTY = settings(
    max_examples=100, derandomize=True, database=None, deadline=None,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip


def decoder_accepts(topic: str, value: bytes) -> bool:
    """The full decode function's verdict."""
    out = ContractDecoder(topic, MESSAGES[topic], BIG).decode(Raw(value, None, 0, 0))
    return not isinstance(out, Rejected)


def fast_accepts(topic: str, value: bytes) -> bool:
    """msgspec and the extra check alone, as the fast path runs them."""
    struct = MESSAGES[topic]
    try:
        msg = msgspec.json.decode(value, type=struct)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return False
    check = extra_check(struct)
    return check is None or check(msg)


def schema_accepts(topic: str, value: bytes) -> bool:
    return first_error(topic, json.loads(value)) is None


def has_integral_float(data: Any) -> bool:
    if isinstance(data, float):
        return data.is_integer()
    if isinstance(data, dict):
        return any(has_integral_float(v) for v in data.values())
    if isinstance(data, list):
        return any(has_integral_float(v) for v in data)
    return False


def assert_same_verdict(topic: str, payload: Any) -> bool:
    """The decoder's verdict is the schema's; returns it."""
    value = json.dumps(payload).encode()
    expected = schema_accepts(topic, value)
    assert decoder_accepts(topic, value) == expected, (topic, payload)
    fast = fast_accepts(topic, value)
    assert not fast or expected, ("fast path accepted what the schema refuses", topic, payload)
    if expected and not fast:
        assert has_integral_float(payload), ("fast path refused a valid message", topic, payload)
    return expected


# -- the Struct has the schema's shape ------------------------------------------------------------
def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in node:
        return node
    target = defs[node["$ref"].removeprefix("#/$defs/")]
    return {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}


def _nested_struct(annotation: Any) -> type[msgspec.Struct] | None:
    """The Struct inside ``X | UnsetType`` or ``Annotated[...]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _nested_struct(arg)
            if found is not None:
                return found
    return None


def _assert_shape(struct: type[msgspec.Struct], schema: dict[str, Any], defs: dict[str, Any],
                  where: str) -> None:  # fmt: skip
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    assert list(fields) == list(schema["properties"]), f"{where}: fields or their order differ"
    required = {name for name, f in fields.items() if f.required}
    assert required == set(schema.get("required", [])), f"{where}: required fields differ"
    for name, f in fields.items():
        nested = _nested_struct(f.type)
        if nested is not None:
            _assert_shape(nested, _resolve(schema["properties"][name], defs), defs,
                          f"{where}.{name}")  # fmt: skip


@pytest.mark.parametrize("topic", TOPICS)
def test_every_struct_has_its_schemas_fields_in_order_and_its_required_set(topic: str) -> None:
    schema = load_schema(topic)
    _assert_shape(MESSAGES[topic], schema, schema.get("$defs", {}), topic)


# -- examples -------------------------------------------------------------------------------------
@pytest.mark.parametrize("topic", TOPICS)
def test_every_valid_example_decodes_and_encodes_back_unchanged(topic: str) -> None:
    for payload in examples(topic)[0]:
        value = json.dumps(payload).encode()
        assert fast_accepts(topic, value), payload
        msg = msgspec.json.decode(value, type=MESSAGES[topic])
        assert json.loads(msgspec.json.encode(msg)) == payload  # optionals absent, not null


@pytest.mark.parametrize("topic", TOPICS)
def test_every_invalid_example_is_refused_by_the_decoder_and_its_fast_path(topic: str) -> None:
    for name, payload in examples(topic)[1]:
        value = json.dumps(payload).encode()
        assert not fast_accepts(topic, value), name
        assert not decoder_accepts(topic, value), name


# What msgspec alone lets through, and the extra check in the same decode refuses.
BEYOND_MSGSPEC = {
    ("ad-requests", "candidates-duplicate"),  # uniqueItems
    ("user-events", "ad_id-without-decision_id"),  # dependentRequired
}


def test_what_msgspec_cannot_say_is_said_by_the_extra_check_in_the_same_decode() -> None:
    passes_msgspec = set()
    for topic in TOPICS:
        for name, payload in examples(topic)[1]:
            try:
                msgspec.json.decode(json.dumps(payload), type=MESSAGES[topic])
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue
            passes_msgspec.add((topic, name))
    assert passes_msgspec == BEYOND_MSGSPEC  # a new gap must be named here, and closed
    for topic, name in BEYOND_MSGSPEC:
        payload = dict(examples(topic)[1])[name]
        assert not decoder_accepts(topic, json.dumps(payload).encode())


def test_a_duplicate_targeting_list_entry_is_refused_as_the_schema_does() -> None:
    ad = examples("ad-catalog")[0][0]
    twice = {**ad, "targeting": {"placements": ["home", "home"]}}
    assert first_error("ad-catalog", twice) is not None
    assert not decoder_accepts("ad-catalog", json.dumps(twice).encode())


def test_an_integral_float_is_an_integer_at_any_depth_as_in_the_schema() -> None:
    label = examples("ctr-feedback")[0][0]
    payload = {**label, "clicked": 1.0, "features": {**label["features"], "hour": 3.0}}
    value = json.dumps(payload).encode()
    assert schema_accepts("ctr-feedback", value) and not fast_accepts("ctr-feedback", value)
    msg = ContractDecoder("ctr-feedback", MESSAGES["ctr-feedback"]).decode(Raw(value, None, 0, 0))
    assert not isinstance(msg, Rejected)
    assert msg.clicked == 1 and msg.features.hour == 3  # type: ignore[attr-defined]


def test_a_no_fill_decision_writes_null_ad_id_and_leaves_unset_optionals_out() -> None:
    decision = AdDecision(request_id="r1", user_id="u1", ad_id=None, score=0.0, pctr=0.0,
                          bid=0.0, propensity=1.0, policy="greedy", model_version="v1", ts=1,
                          latency_ms=0.2)  # fmt: skip
    wire = json.loads(msgspec.json.encode(decision))
    assert wire["ad_id"] is None
    assert "placement" not in wire and "features" not in wire
    assert first_error("ad-decisions", wire) is None


def test_an_ad_without_active_is_served() -> None:
    valid, _ = examples("ad-catalog")
    payload = next(ad for ad in valid if "active" not in ad)
    ad = msgspec.json.decode(json.dumps(payload), type=MESSAGES["ad-catalog"])
    assert ad.is_active  # type: ignore[attr-defined]
    paused = msgspec.json.decode(json.dumps({**payload, "active": False}), type=type(ad))
    assert not paused.is_active  # type: ignore[attr-defined]


# -- Hypothesis payloads drawn from the schema itself ---------------------------------------------
def _regex(pattern: str) -> str:
    """ECMA's ``$`` (end of input) for Python, as schemas.validator does."""
    return pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern


def _string(node: dict[str, Any]) -> st.SearchStrategy[str]:
    lo, hi = node.get("minLength", 0), node.get("maxLength", 64)
    if "pattern" in node:
        short = st.from_regex(re.compile(_regex(node["pattern"])), fullmatch=False)
        return short.filter(lambda s: lo <= len(s) <= hi)
    edge = st.text(alphabet="x", min_size=hi, max_size=hi) if hi <= 4096 else st.nothing()
    return st.text(min_size=lo, max_size=min(hi, lo + 16)) | edge


def _number(node: dict[str, Any], integer: bool) -> st.SearchStrategy[Any]:
    lo = node.get("minimum", node.get("exclusiveMinimum"))
    hi = node.get("maximum", node.get("exclusiveMaximum"))
    if integer:
        lo = None if lo is None else lo + ("exclusiveMinimum" in node)
        return st.integers(lo, hi)
    floats = st.floats(lo, hi, allow_nan=False, allow_infinity=False,
                       exclude_min="exclusiveMinimum" in node)  # fmt: skip
    ints = st.integers(None if lo is None else int(lo) + 1, None if hi is None else int(hi))
    return floats | ints


def from_schema(node: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Payloads valid by ``node``, for the keywords our schemas use."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        return st.one_of([from_schema(branch, defs) for branch in node["anyOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node["type"]
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        return _number(node, kind == "integer")
    if kind == "string":
        return _string(node)
    if kind == "array":
        lo, hi = node.get("minItems", 0), min(node.get("maxItems", 6), 6)
        items = from_schema(node["items"], defs)
        return st.lists(
            items, min_size=lo, max_size=max(lo, hi), unique=node.get("uniqueItems", False)
        )
    props = {name: from_schema(p, defs) for name, p in node["properties"].items()}
    required = set(node.get("required", []))
    out = st.fixed_dictionaries(
        {k: v for k, v in props.items() if k in required},
        optional={k: v for k, v in props.items() if k not in required},
    )
    for key, needs in node.get("dependentRequired", {}).items():
        out = out.filter(functools.partial(_has_all, key, set(needs)))
    return out


def _has_all(key: str, needs: set[str], payload: dict[str, Any]) -> bool:
    """``dependentRequired``: ``needs`` present wherever ``key`` is."""
    return key not in payload or needs <= set(payload)


@functools.cache  # one strategy object per topic: building one compiles its regexes
def valid_payloads(topic: str) -> st.SearchStrategy[dict[str, Any]]:
    schema = load_schema(topic)
    return from_schema(schema, schema.get("$defs", {}))


HOSTILE: list[Any] = [
    None, True, 0, -1, 1.0, 1.5, 2**63, -(2**63) - 1, 24, 253_402_300_800_000, 1e308, "", "x",
    "A" * 129, "home\n", "HOME", "\u202e", [], [1], ["a", "a"], {}, {"x": 1},
]  # fmt: skip


@st.composite
def broken_payloads(draw: st.DrawFn, topic: str) -> dict[str, Any]:
    """A valid payload changed at one place: a field dropped, added or given a hostile value,
    or a list's item repeated."""
    payload = copy.deepcopy(draw(valid_payloads(topic)))  # never a value Hypothesis keeps
    parents = [payload] + [v for v in payload.values() if isinstance(v, dict)]
    parent = draw(st.sampled_from(parents))
    how = draw(st.sampled_from(["drop", "add", "value", "repeat"]))
    if how == "add" or not parent:
        parent[draw(st.sampled_from(["extra", "userId", "x"]))] = draw(st.sampled_from(HOSTILE))
        return payload
    key = draw(st.sampled_from(sorted(parent)))
    if how == "drop":
        del parent[key]
    elif how == "repeat" and isinstance(parent[key], list) and parent[key]:
        parent[key] = [*parent[key], parent[key][0]]
    else:
        parent[key] = draw(st.sampled_from(HOSTILE))
    return payload


@pytest.mark.parametrize("topic", TOPICS)
def test_the_decoder_accepts_what_hypothesis_draws_from_the_schema(topic: str) -> None:
    @PROPERTY
    @given(valid_payloads(topic))
    def check(payload: dict[str, Any]) -> None:
        assert first_error(topic, payload) is None, payload  # the generator is right
        assert assert_same_verdict(topic, payload)

    check()


@pytest.mark.parametrize("topic", TOPICS)
def test_the_decoder_and_the_schema_agree_on_payloads_broken_at_one_place(topic: str) -> None:
    refused: list[bool] = []

    @PROPERTY
    @given(broken_payloads(topic))
    def check(payload: dict[str, Any]) -> None:
        refused.append(not assert_same_verdict(topic, payload))

    check()
    assert sum(refused) > len(refused) // 3  # most breaks break the contract
