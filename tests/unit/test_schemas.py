"""The topic contracts hold together: schemas, examples and TOPICS agree.

A producer in another language reads only the JSON files, our workers the
Structs of schemas/messages.py; these tests and tests/unit/test_messages.py
are what keeps the two one contract.
"""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

import schemas
from schemas import SCHEMA_DIR, examples, first_error, load_schema, topic_names, validator
from schemas.messages import MESSAGES
from schemas.topics import TOPICS, WEEK_MS

EXPECTED_TOPICS = {
    "user-events",
    "ad-requests",
    "ad-decisions",
    "ctr-feedback",
    "ad-catalog",
    "item-catalog",
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


def test_the_nine_topics_have_schema_files() -> None:
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


# --- helpers for TOPICS -------------------------------------------------------


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


# --- TOPICS -------------------------------------------------------------------


def test_topics_cover_exactly_the_schema_files() -> None:
    assert set(TOPICS) == set(TOPIC_NAMES) == EXPECTED_TOPICS
    for name, spec in TOPICS.items():
        assert spec.name == name
        assert (SCHEMA_DIR / spec.schema_file).is_file()
        assert spec.message is MESSAGES[name]
        assert spec.description


@pytest.mark.parametrize("topic", sorted(EXPECTED_TOPICS))
def test_every_key_field_is_a_required_string(topic: str) -> None:
    spec = TOPICS[topic]
    if spec.key_field is None:
        return
    schema = load_schema(topic)
    assert spec.key_field in schema["required"]
    assert _schema_json_types(schema["properties"][spec.key_field], schema["$defs"]) == {"string"}


def test_the_catalogs_are_compacted_and_kept_forever_the_rest_a_week() -> None:
    for name in ("ad-catalog", "item-catalog"):
        assert TOPICS[name].compacted
        assert TOPICS[name].retention_ms is None  # bench-ok: a config
    for name, spec in TOPICS.items():
        if name not in ("ad-catalog", "item-catalog"):
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
