"""Decode a topic's messages fast, with the JSON Schema as the final word.

A jsonschema check costs ~30 us a message, more than a whole event's budget, so
each input topic has a msgspec Struct (schemas/messages.py) that encodes the
same constraints (~1 us). Only a message the Struct rejects is looked at by the
real schema validator, which names the reason, and also rescues the rare
message the schema allows but the Struct does not (``1.0`` for an integer, at
any depth). tests/unit/test_messages.py holds each decoder to its schema: both
accept and refuse the same messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from schemas import first_error
from schemas.messages import extra_check
from streams.deadletter import Raw, Rejected

T = TypeVar("T", bound=msgspec.Struct)


def _no_constants(name: str) -> Any:
    msg = f"{name} is not JSON"
    raise ValueError(msg)


def _lone_surrogate(obj: Any) -> str | None:
    """The first string (key or value) holding a lone UTF-16 surrogate, else None.

    JSON may spell one (``"\\ud800"``) but it is no Unicode character: it cannot be
    encoded as UTF-8, so it could never become a key, a table key or an output
    record (RFC 7493, I-JSON, forbids it for that reason). Iterative: no recursion.
    """
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


def parse_json(value: bytes) -> tuple[Any, str | None]:
    """``(data, None)`` for a JSON document we can use, else ``(None, why)``: one line.

    Refused: invalid UTF-8, not JSON, NaN/Infinity, nesting deeper than Python's
    recursion limit (a ~1000-level ``[[[...]]]`` bomb fits in a few kilobytes), and
    lone surrogates (see :func:`_lone_surrogate`).
    """
    try:
        data = json.loads(value, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"not JSON: {exc}"[:300]
    except RecursionError:
        return None, "not JSON we accept: nested too deeply"
    bad = _lone_surrogate(data)
    if bad is not None:
        return None, f"not JSON we accept: lone UTF-16 surrogate in string {bad[:40]!r}"
    return data, None


def _integral_floats_to_int(data: Any) -> Any:
    """``data`` with every integral float within int64 (``1.0``) as an int, at any depth.

    JSON Schema's ``integer`` admits ``1.0``, msgspec's ``int`` does not; a ``float``
    field takes an int as well, so the swap is safe for every field. Only for data the
    schema has accepted: nested a few levels at most.
    """
    if isinstance(data, float):
        return int(data) if data.is_integer() and abs(data) < 2**63 else data
    if isinstance(data, dict):
        return {k: _integral_floats_to_int(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_integral_floats_to_int(v) for v in data]
    return data


class ContractDecoder(Generic[T]):
    """Bytes -> Struct for one topic, or a rejection reason (a metric label) and message."""

    def __init__(self, topic: str, struct: type[T], max_bytes: int = 8192) -> None:
        """``struct``: the topic's Struct (schemas/messages.py); what msgspec cannot check
        about it (:func:`schemas.messages.extra_check`) is checked here too."""
        self.topic = topic
        self.struct = struct
        self.extra_check: Callable[[T], bool] | None = extra_check(struct)
        self.max_bytes = max_bytes
        self._decode = msgspec.json.Decoder(struct).decode

    def decode(self, raw: Raw) -> T | Rejected:
        value = raw.value
        if value is None:
            return Rejected(raw, "invalid_json", "empty message (null value)")
        if len(value) > self.max_bytes:
            return Rejected(raw, "too_large", f"{len(value)} bytes > limit {self.max_bytes}")
        try:
            obj = self._decode(value)
            if self.extra_check is None or self.extra_check(obj):
                return obj  # msgspec itself refuses lone surrogates, escaped or not
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            pass  # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a string
        return self._slow(raw, value)

    def _slow(self, raw: Raw, value: bytes) -> T | Rejected:
        data, why = parse_json(value)
        if why is not None:
            return Rejected(raw, "invalid_json", why)
        try:
            problem = first_error(self.topic, data)
        except RecursionError:  # deep nesting the parser took but the validator cannot walk
            problem = "nested too deeply to validate"
        if problem is not None:
            return Rejected(raw, "schema", problem)
        try:  # valid by the schema, so only its integral floats can stop msgspec
            return msgspec.convert(_integral_floats_to_int(data), self.struct)
        except msgspec.ValidationError as exc:
            return Rejected(raw, "schema", str(exc))

    def split(self, raws: Sequence[Raw]) -> tuple[list[tuple[T, Raw]], list[Rejected]]:
        good: list[tuple[T, Raw]] = []
        bad: list[Rejected] = []
        for raw in raws:
            out = self.decode(raw)
            if isinstance(out, Rejected):
                bad.append(out)
            else:
                good.append((out, raw))
        return good, bad


class HasUser(Protocol):
    user_id: str


U = TypeVar("U", bound=HasUser)


def key_problem(key: bytes | None, user_id: str) -> str | None:
    """Why a record keyed ``key`` must not be applied to ``user_id``, else None.

    ``user-events``, ``ad-requests`` and ``forget-requests`` are keyed by the raw
    user id (the engine's own producers do so), so Kafka's partitioner puts all of
    a user's records on one partition, the one that holds the user's state. A
    record under another key, or none (the partitioner then spreads it anywhere),
    would write or read that state on a partition that is not the user's: with
    two workers the state splits and lookups see half of it. Such a record is
    refused, not re-keyed: its producer is broken or hostile, and only it can
    tell which of the two ids it meant.
    """
    if key is None:
        return "record has no key: key it by its user_id, so a user's records share a partition"
    if key != user_id.encode():
        return "record key is not its user_id: key it by the user_id in its body"
    return None


def split_by_key(good: Sequence[tuple[U, Raw]]) -> tuple[list[tuple[U, Raw]], list[Rejected]]:
    """Records keyed by their own raw ``user_id``, and the rest as ``key_mismatch``."""
    kept: list[tuple[U, Raw]] = []
    bad: list[Rejected] = []
    for msg, raw in good:
        why = key_problem(raw.key, msg.user_id)
        if why is None:
            kept.append((msg, raw))
        else:
            bad.append(Rejected(raw, "key_mismatch", why))
    return kept, bad
