"""Topic contracts: one JSON Schema per topic, with examples, as the source of truth.

Everything that reads or writes a topic checks messages against these files,
so a producer in another language and our workers agree on one definition.
Loading is cached and validators are built (and their schema checked) once,
so call :func:`validator` at startup to fail fast on a broken schema.

Beside the files: ``schemas.messages``, one msgspec Struct per topic (how the
workers decode and encode these contracts), and ``schemas.topics``, each topic's
key, retention and compaction. This package imports no framework.

>>> first_error("user-events", {"event_id": "e1", "user_id": "u1", "kind": "view",
...                             "item_id": 1, "category_id": 2, "ts": 0})
"kind: 'view' is not one of ['browse', 'click', 'cart', 'fav', 'purchase']"
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator

__all__ = ["SCHEMA_DIR", "examples", "first_error", "load_schema", "topic_names", "validator"]

SCHEMA_DIR = Path(__file__).resolve().parent
_SUFFIX = ".schema.json"
_MAX_MESSAGE = 300


def topic_names() -> list[str]:
    """Topics that have a schema file, sorted."""
    return sorted(p.name.removesuffix(_SUFFIX) for p in SCHEMA_DIR.glob(f"*{_SUFFIX}"))


def _schema_path(topic: str) -> Path:
    known = topic_names()
    if topic not in known:
        msg = f"no schema for topic {topic!r}; known topics: {', '.join(known)}"
        raise LookupError(msg)
    return SCHEMA_DIR / f"{topic}{_SUFFIX}"


@cache
def load_schema(topic: str) -> dict[str, Any]:
    """The topic's JSON Schema as a dict; shared between callers, so do not mutate it."""
    schema: dict[str, Any] = json.loads(_schema_path(topic).read_text(encoding="utf-8"))
    return schema


def _is_json_number(_checker: object, instance: object) -> bool:
    """JSON has no NaN or Infinity; Python's json module reads them anyway, so refuse them."""
    if not Draft202012Validator.TYPE_CHECKER.is_type(instance, "number"):
        return False
    return isinstance(instance, int) or math.isfinite(instance)  # type: ignore[arg-type]


@cache
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    r"""Compile a schema pattern with ECMA-262's ``$`` (end of input).

    Python's ``$`` also matches before a trailing newline, so "home\n" would
    pass ``^[a-z0-9_.-]+$`` here and fail in every other validator. Our
    patterns only anchor at the very end, which is the case handled.
    """
    trailing_backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
    if pattern.endswith("$") and trailing_backslashes % 2 == 0:
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern(
    _validator: Validator, pattern: str, instance: object, _schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if isinstance(instance, str) and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Strict2020 = validators.extend(
    Draft202012Validator,
    validators={"pattern": _pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("number", _is_json_number),
)


@cache
def validator(topic: str) -> Validator:
    """A draft 2020-12 validator for the topic, with formats asserted.

    It is ``Draft202012Validator`` with two fixes that make Python agree with
    validators in other languages: numbers must be finite, and ``$`` in a
    pattern means end of string. Raises ``SchemaError`` if the schema is broken.
    """
    schema = load_schema(topic)
    Draft202012Validator.check_schema(schema)
    checker = Draft202012Validator.FORMAT_CHECKER
    instance: Validator = _Strict2020(schema, format_checker=checker)
    return instance


def examples(topic: str) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """The topic's example messages: (valid payloads, [(file stem, invalid payload)]).

    Files live in ``examples/<topic>/{valid,invalid}/*.json`` and are read
    fresh each call, sorted by name; an invalid file is named for what is wrong.
    """
    _schema_path(topic)
    valid = [payload for _, payload in _read_examples(topic, "valid")]
    return valid, _read_examples(topic, "invalid")


def _read_examples(topic: str, kind: str) -> list[tuple[str, Any]]:
    folder = SCHEMA_DIR / "examples" / topic / kind
    return [
        (path.stem, json.loads(path.read_text(encoding="utf-8")))
        for path in sorted(folder.glob("*.json"))
    ]


def first_error(topic: str, payload: Any) -> str | None:
    """One line saying what is most wrong with ``payload``, or None if it is valid.

    The line starts with the JSON path of the offending value (``$`` for the
    message itself), so it can go straight into a dead letter or a log. Use
    ``validator(topic).is_valid`` on the hot path; this is for the bad ones.
    """
    error = best_match(validator(topic).iter_errors(payload))
    if error is None:
        return None
    line = f"{_path(error)}: {error.message}".replace("\n", " ")
    if len(line) > _MAX_MESSAGE:
        line = line[: _MAX_MESSAGE - 1] + "…"
    return line


def _path(error: ValidationError) -> str:
    """``context.device``, ``features.interest[3]``, or ``$`` for the root."""
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.removeprefix(".") or "$"
