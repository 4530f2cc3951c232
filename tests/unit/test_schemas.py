"""The topic contracts hold together: schemas, examples, Records and TOPICS agree.

A producer in another language reads only the JSON files, our workers mostly
the Records; these tests are what keeps the two one contract.
"""

from __future__ import annotations

import doctest
import json
import math
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import faust
import pytest
from jsonschema import Draft202012Validator

import schemas
from schemas import SCHEMA_DIR, examples, first_error, load_schema, topic_names, validator
from streams.records import Ad, AdDecision
from streams.topics import TOPICS, WEEK_MS

EXPECTED_TOPICS = {
    "user-events",
    "ad-requests",
    "ad-decisions",
    "ctr-feedback",
    "ad-catalog",
    "dead-letters",
    "forget-requests",
    "forget-confirmations",
}
TOPIC_NAMES = topic_names()


def _example_params(kind: str) -> list[Any]:
    """One case per example file, with an id that names the file."""
    return [
        pytest.param(path.parent.parent.name, path, id=f"{path.parent.parent.name}/{path.name}")
        for path in sorted(SCHEMA_DIR.glob(f"examples/*/{kind}/*.json"))
    ]


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --- schemas -----------------------------------------------------------------


def test_the_eight_topics_have_schema_files() -> None:
    assert set(TOPIC_NAMES) == EXPECTED_TOPICS


@pytest.mark.parametrize("topic", TOPIC_NAMES)
def test_every_schema_is_a_valid_2020_12_schema(topic: str) -> None:
    schema = load_schema(topic)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://adpulse.dev/schemas/{topic}.schema.json"
    assert schema["title"] == topic
    assert schema["description"]


def _objects(node: Any, where: str = "$") -> list[tuple[str, dict[str, Any]]]:
    """Every sub-schema that declares properties, with where it sits."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if "properties" in node:
            found.append((where, node))
        for key, child in node.items():
            found += _objects(child, f"{where}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found += _objects(child, f"{where}/{i}")
    return found


@pytest.mark.parametrize("topic", TOPIC_NAMES)
def test_every_object_is_closed_so_typos_are_caught(topic: str) -> None:
    for where, obj in _objects(load_schema(topic)):
        assert obj.get("additionalProperties") is False, where


@pytest.mark.parametrize("topic", TOPIC_NAMES)
def test_every_property_says_what_it_means(topic: str) -> None:
    for where, obj in _objects(load_schema(topic)):
        for name, prop in obj["properties"].items():
            assert prop.get("description"), f"{where}/properties/{name}"


# --- examples ----------------------------------------------------------------


@pytest.mark.parametrize("topic", TOPIC_NAMES)
def test_every_topic_has_enough_examples(topic: str) -> None:
    valid, invalid = examples(topic)
    assert len(valid) >= 3
    assert len(invalid) >= 5


@pytest.mark.parametrize(("topic", "path"), _example_params("valid"))
def test_every_valid_example_is_accepted(topic: str, path: Path) -> None:
    assert first_error(topic, _read(path)) is None


def _subject(stem: str) -> str:
    """The field an invalid example's name blames.

    ``missing-user_id`` -> ``user_id``, ``context.device-unknown`` -> ``device``,
    ``extra-targeting.age`` -> ``age``, ``root-...`` -> ``$`` (the message itself).
    """
    head = stem.removeprefix("missing-").removeprefix("extra-").split("-")[0]
    return "$" if head == "root" else head.rsplit(".", 1)[-1]


@pytest.mark.parametrize(("topic", "path"), _example_params("invalid"))
def test_every_invalid_example_is_rejected_for_the_reason_in_its_name(
    topic: str, path: Path
) -> None:
    error = first_error(topic, _read(path))
    assert error is not None, "accepted, but it is an invalid example"
    subject = _subject(path.stem)
    if subject == "$":
        assert error.startswith("$: "), error
    else:
        assert subject in error, error


@pytest.mark.parametrize("topic", TOPIC_NAMES)
def test_examples_returns_the_files_sorted_by_name(topic: str) -> None:
    folder = SCHEMA_DIR / "examples" / topic
    valid, invalid = examples(topic)
    assert valid == [_read(p) for p in sorted((folder / "valid").glob("*.json"))]
    assert invalid == [(p.stem, _read(p)) for p in sorted((folder / "invalid").glob("*.json"))]


# --- Records mirror schemas --------------------------------------------------

_JSON_TYPE = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _python_json_types(annotation: Any) -> set[str]:
    """JSON types a Record annotation admits: str->string, X | None -> X's + null, ..."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*(_python_json_types(arg) for arg in get_args(annotation)))
    if annotation is type(None):
        return {"null"}
    if origin is Literal:
        return {_JSON_TYPE[type(value)] for value in get_args(annotation)}
    if origin is list:
        return {"array"}
    if isinstance(annotation, type) and issubclass(annotation, faust.Record):
        return {"object"}
    return {_JSON_TYPE[annotation]}


def _resolve(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a local ``$ref`` (siblings such as description win)."""
    if "$ref" not in prop:
        return prop
    target = defs[prop["$ref"].removeprefix("#/$defs/")]
    rest = {k: v for k, v in prop.items() if k != "$ref"}
    return {**_resolve(target, defs), **rest}


def _schema_json_types(prop: dict[str, Any], defs: dict[str, Any]) -> set[str]:
    prop = _resolve(prop, defs)
    if "anyOf" in prop:
        return set().union(*(_schema_json_types(p, defs) for p in prop["anyOf"]))
    declared = prop["type"]
    return {declared} if isinstance(declared, str) else set(declared)


def _non_null(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    is_optional = get_origin(annotation) in (Union, types.UnionType)
    return args[0] if is_optional and len(args) == 1 else annotation


def _non_null_schema(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    prop = _resolve(prop, defs)
    branches = [p for p in prop.get("anyOf", []) if _resolve(p, defs).get("type") != "null"]
    return _resolve(branches[0], defs) if len(branches) == 1 else prop


def _assert_value_matches(
    annotation: Any, prop: dict[str, Any], defs: dict[str, Any], where: str
) -> None:
    """Types agree, and so do enum values, list item types and nested Records."""
    assert _python_json_types(annotation) - {"null"} == _schema_json_types(prop, defs) - {"null"}, (
        f"{where}: {annotation} vs schema {_schema_json_types(prop, defs)}"
    )
    inner, prop = _non_null(annotation), _non_null_schema(prop, defs)
    if get_origin(inner) is Literal:
        assert set(get_args(inner)) == set(prop["enum"]), f"{where}: enum values differ"
    elif get_origin(inner) is list:
        (item,) = get_args(inner)
        _assert_value_matches(item, prop["items"], defs, f"{where}[]")
    elif isinstance(inner, type) and issubclass(inner, faust.Record):
        _assert_record_matches(inner, prop, defs, where)


def _assert_record_matches(
    record: type[faust.Record], schema: dict[str, Any], defs: dict[str, Any], where: str
) -> None:
    fields = dict(record._options.fields)
    properties: dict[str, Any] = schema["properties"]
    assert set(fields) == set(properties), f"{where}: field names differ"
    required = set(schema.get("required", []))
    record_required = {name for name, d in record._options.descriptors.items() if d.required}
    record_required |= getattr(record, "required_nullable", frozenset())
    assert record_required == required, f"{where}: required fields differ"
    for name, annotation in fields.items():
        may_be_none = "null" in _python_json_types(annotation)
        may_be_missing_or_null = name not in required or "null" in _schema_json_types(
            properties[name], defs
        )
        assert may_be_none == may_be_missing_or_null, f"{where}.{name}: optional in only one"
        _assert_value_matches(annotation, properties[name], defs, f"{where}.{name}")


@pytest.mark.parametrize("topic", TOPIC_NAMES)
def test_every_record_agrees_with_its_schema(topic: str) -> None:
    schema = load_schema(topic)
    _assert_record_matches(TOPICS[topic].record, schema, schema.get("$defs", {}), topic)


@pytest.mark.parametrize(("topic", "path"), _example_params("valid"))
def test_every_valid_example_round_trips_through_its_record(topic: str, path: Path) -> None:
    payload = _read(path)
    record = TOPICS[topic].record.from_data(payload)
    assert record.to_representation() == payload
    assert json.loads(record.dumps()) == payload


def test_a_no_fill_decision_writes_null_ad_id_and_omits_unset_optionals() -> None:
    decision = AdDecision(
        request_id="r1",
        user_id="u1",
        ad_id=None,
        score=0.0,
        pctr=0.0,
        bid=0.0,
        propensity=1.0,
        policy="greedy",
        model_version="v1",
        ts=1,
        latency_ms=0.2,
    )
    wire = json.loads(decision.dumps())
    assert wire["ad_id"] is None
    assert "placement" not in wire
    assert first_error("ad-decisions", wire) is None


def test_an_ad_without_active_is_served() -> None:
    valid, _ = examples("ad-catalog")
    payload = next(ad for ad in valid if "active" not in ad)
    assert Ad.from_data(payload).is_active
    assert not Ad.from_data({**payload, "active": False}).is_active


# --- TOPICS -------------------------------------------------------------------


def test_topics_cover_exactly_the_schema_files() -> None:
    assert set(TOPICS) == set(TOPIC_NAMES) == EXPECTED_TOPICS
    for name, spec in TOPICS.items():
        assert spec.name == name
        assert (SCHEMA_DIR / spec.schema_file).is_file()
        assert spec.description


@pytest.mark.parametrize("topic", sorted(EXPECTED_TOPICS))
def test_every_key_field_is_a_required_string(topic: str) -> None:
    spec = TOPICS[topic]
    if spec.key_field is None:
        return
    schema = load_schema(topic)
    assert spec.key_field in schema["required"]
    assert _schema_json_types(schema["properties"][spec.key_field], schema["$defs"]) == {"string"}


def test_the_catalog_is_compacted_and_kept_forever_the_rest_a_week() -> None:
    assert TOPICS["ad-catalog"].compacted
    assert TOPICS["ad-catalog"].retention_ms is None  # bench-ok: a config
    for name, spec in TOPICS.items():
        if name != "ad-catalog":
            assert not spec.compacted
            assert spec.retention_ms == WEEK_MS == 7 * 24 * 3600 * 1000  # bench-ok: a config


# --- the public API ------------------------------------------------------------


def _browse_event(**changes: Any) -> dict[str, Any]:
    event = {"event_id": "e1", "user_id": "u1", "kind": "browse", "item_id": 1, "category_id": 2}
    return {**event, "ts": 1_700_000_000_000, **changes}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_rejected(value: float) -> None:
    assert first_error("user-events", _browse_event(price=value)) is not None
    feedback, _ = examples("ctr-feedback")
    payload = {**feedback[0], "features": {"interest": [0.5, value]}}
    assert (
        first_error("ctr-feedback", payload)
        == f"features.interest[1]: {value!r} is not of type 'number'"
    )


def test_a_big_integer_is_still_a_number() -> None:
    assert first_error("user-events", _browse_event(price=10**400)) is None


def test_first_error_names_the_path_of_the_offending_value() -> None:
    assert first_error("user-events", _browse_event()) is None
    assert first_error("user-events", _browse_event(kind="view")) == (
        "kind: 'view' is not one of ['browse', 'click', 'cart', 'fav', 'purchase']"
    )
    request = {"request_id": "r", "user_id": "u", "placement": "p", "ts": 0}
    assert first_error("ad-requests", {**request, "context": {"device": "phone"}}) == (
        "context.device: 'phone' is not one of ['mobile', 'desktop', 'tablet', 'tv', 'other']"
    )
    assert first_error("ad-requests", {"user_id": "u", "placement": "p", "ts": 0}) == (
        "$: 'request_id' is a required property"
    )


def test_first_error_is_one_short_line_even_for_huge_values() -> None:
    error = first_error("user-events", _browse_event(kind="x\n" * 10_000))
    assert error is not None
    assert "\n" not in error
    assert len(error) <= 300


def test_an_unknown_topic_error_lists_the_known_ones() -> None:
    with pytest.raises(LookupError, match="known topics: ad-catalog, ad-decisions"):
        load_schema("user-event")


def test_the_validator_is_built_once_per_topic() -> None:
    assert validator("user-events") is validator("user-events")
    assert validator("user-events").format_checker is not None


def test_docstring_examples_hold() -> None:
    assert doctest.testmod(schemas).failed == 0
