"""Decode and validate ``user-events`` in batches; everything invalid becomes a dead letter.

The JSON Schema in ``schemas/`` is the contract, but a jsonschema check costs
~30 us a message, more than our whole per-event budget. So the hot path decodes
with msgspec into a Struct that encodes the same constraints (~1 us), and only a
message msgspec rejects is looked at again by the real schema validator: that
slow path names the reason and also rescues the rare message the schema allows
but the Struct does not (``1.0`` for an integer). A property test holds the two
in agreement: whatever the fast path accepts, the schema accepts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from schemas import first_error
from scoring.features import KIND_INDEX, EventBatch, fingerprint
from streams.deadletter import Raw, Rejected

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Int64Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
EpochMs = Annotated[int, msgspec.Meta(ge=0, le=253_402_300_799_999)]
UNSET = msgspec.UNSET


class UserEventMsg(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The user-events contract (schemas/user-events.schema.json) as a msgspec Struct."""

    event_id: Id
    user_id: Id
    kind: Literal["browse", "click", "cart", "fav", "purchase"]
    item_id: Int64Id
    category_id: Int64Id
    ts: EpochMs
    price: Annotated[float, msgspec.Meta(ge=0)] | msgspec.UnsetType = UNSET
    ad_id: Id | msgspec.UnsetType = UNSET
    decision_id: Id | msgspec.UnsetType = UNSET


_decode = msgspec.json.Decoder(UserEventMsg).decode

# Reasons a message is dead-lettered: a metric label, so a fixed, small set.
REASONS = ("too_large", "invalid_json", "schema", "future_ts")


def _fast_ok(ev: UserEventMsg) -> bool:
    """What msgspec cannot express: finite price, ad_id and decision_id together."""
    if (ev.ad_id is UNSET) != (ev.decision_id is UNSET):
        return False
    return ev.price is UNSET or math.isfinite(ev.price)


def _no_constants(name: str) -> Any:
    msg = f"{name} is not JSON"
    raise ValueError(msg)


def _slow(raw: bytes) -> tuple[UserEventMsg | None, str, str]:
    """Authoritative verdict from the JSON Schema: (event or None, reason, message)."""
    try:
        obj = json.loads(raw, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, "invalid_json", f"not JSON: {exc}"[:300]
    problem = first_error("user-events", obj)
    if problem is not None:
        return None, "schema", problem
    # Valid by the schema; only msgspec's stricter typing said no: JSON Schema's
    # "integer" includes integral floats such as 1.0 or 1.7e12.
    for name in ("item_id", "category_id", "ts"):
        if isinstance(obj[name], float):
            obj[name] = int(obj[name])
    try:
        return msgspec.convert(obj, UserEventMsg), "", ""
    except msgspec.ValidationError as exc:
        return None, "schema", str(exc)


def decode_events(
    raws: Sequence[Raw], now_ms: int, max_bytes: int, max_skew_ms: int
) -> tuple[list[tuple[UserEventMsg, Raw]], list[Rejected]]:
    """Split a batch into valid events (with their source) and rejected messages."""
    good: list[tuple[UserEventMsg, Raw]] = []
    bad: list[Rejected] = []
    horizon = now_ms + max_skew_ms
    for raw in raws:
        value = raw.value
        if value is None:
            bad.append(Rejected(raw, "invalid_json", "empty message (null value)"))
            continue
        if len(value) > max_bytes:
            bad.append(Rejected(raw, "too_large", f"{len(value)} bytes > limit {max_bytes}"))
            continue
        try:
            ev: UserEventMsg | None = _decode(value)
            assert ev is not None
            if not _fast_ok(ev):
                ev, reason, message = _slow(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            ev, reason, message = _slow(value)
        if ev is None:
            bad.append(Rejected(raw, reason, message))
        elif ev.ts > horizon:
            bad.append(
                Rejected(
                    raw,
                    "future_ts",
                    f"ts {ev.ts} is {ev.ts - now_ms} ms in the future (limit {max_skew_ms} ms)",
                )
            )
        else:
            good.append((ev, raw))
    return good, bad


def to_columns(
    good: Sequence[tuple[UserEventMsg, Raw]],
) -> tuple[list[str], EventBatch]:
    """Users of the batch (first-seen order) and the batch's columns, indexed into them."""
    index: dict[str, int] = {}
    user = np.fromiter(
        (index.setdefault(ev.user_id, len(index)) for ev, _ in good), np.int64, len(good)
    )
    batch = EventBatch(
        user=user,
        kind=np.fromiter((KIND_INDEX[ev.kind] for ev, _ in good), np.uint8, len(good)),
        item=np.fromiter((ev.item_id for ev, _ in good), np.int64, len(good)),
        category=np.fromiter((ev.category_id for ev, _ in good), np.int64, len(good)),
        ts=np.fromiter((ev.ts for ev, _ in good), np.int64, len(good)),
        fingerprint=np.fromiter((fingerprint(ev.event_id) for ev, _ in good), np.uint64, len(good)),
        offset=np.fromiter((raw.offset for _, raw in good), np.int64, len(good)),
    )
    return list(index), batch
