"""One msgspec Struct per topic: the JSON Schemas beside this module, as Python types.

The JSON Schemas are the contract (a producer in another language reads only
them); these Structs are how our workers read and write it. A jsonschema check
costs ~30 us a message, more than a whole event's budget; decoding into a Struct
checks the same constraints in ~1 us. ``tests/unit/test_messages.py`` holds each
Struct to its schema: both accept the schema's valid examples and refuse its
invalid ones, and agree on Hypothesis-drawn payloads, valid and mutated.

How the schema's words map to msgspec:

- optional (absent from ``required``): ``X | UnsetType = UNSET``. msgspec leaves an
  UNSET field out when it encodes, so an optional field is absent on the wire,
  never ``null``, as the schemas say. A field that is required but may be null
  (``ad-decisions.ad_id``, ``dead-letters.key_b64``) is ``X | None`` with no default.
- ``additionalProperties: false``: ``forbid_unknown_fields=True`` on every Struct.
- ``pattern``: ``Meta(pattern=...)`` with ``\\Z`` for the schema's ``$`` (ECMA's
  end of input; Python's ``$`` also matches before a final newline).
- ``kw_only=True``: built with keywords only, in the schema's property order,
  which is also the order on the wire. ``gc=False``: a message holds no cycles,
  so the garbage collector need not track millions of them.

What msgspec cannot say, :func:`extra_check` says, and the decoder
(``streams.validate.ContractDecoder``) applies it right after msgspec, in the
same call: ``uniqueItems`` (request candidates, catalog targeting lists) and
``dependentRequired`` (an event's ``ad_id`` and ``decision_id`` come together).
Two more differences are closed by the decoder's slow path, where the schema
itself decides: JSON Schema's ``integer`` admits ``1.0``, msgspec does not; and
msgspec already refuses NaN, Infinity and out-of-range numbers (``1e400``), as
the schemas do (our validator requires finite numbers).

Imports no framework (tests/unit/test_architecture.py): msgspec is a codec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

__all__ = [
    "MESSAGES", "UNSET", "Ad", "AdDecision", "AdRequest", "CtrFeedback", "DeadLetter",
    "FeatureSnapshot", "ForgetConfirmation", "ForgetRequest", "Item", "ModelEvent",
    "RequestContext", "Targeting",
    "UnsetType", "UserEvent", "extra_check",
]  # fmt: skip

# -- shared field types: one per ``$defs`` entry of the schemas ------------------------------------
Id = Annotated[str, Meta(min_length=1, max_length=128)]
Name = Annotated[str, Meta(min_length=1, max_length=64)]
Placement = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9_.-]+\Z")]
Country = Annotated[str, Meta(pattern=r"^[A-Z]{2}\Z")]
Int64Id = Annotated[int, Meta(ge=0, le=2**63 - 1)]
EpochMs = Annotated[int, Meta(ge=0, le=253_402_300_799_999)]  # up to 9999-12-31T23:59:59.999Z
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Propensity = Annotated[float, Meta(gt=0, le=1)]  # IPS divides by it: never 0
Flag = Literal[0, 1]
Device = Literal["mobile", "desktop", "tablet", "tv", "other"]
EventKind = Literal["browse", "click", "cart", "fav", "purchase"]
Billing = Literal["cpm", "cpc", "cpa"]
Base64 = Annotated[
    str, Meta(pattern=r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
]
Label = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*\Z")]
Interest = Annotated[list[float], Meta(max_length=1024)]


class _Message(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Base of every message: its options are inherited (``kw_only`` is not: each says it)."""


# -- user-events ----------------------------------------------------------------------------------
class UserEvent(_Message, kw_only=True):
    """``user-events``: one user action, keyed by ``user_id``."""

    event_id: Id
    user_id: Id
    kind: EventKind
    item_id: Int64Id
    category_id: Int64Id
    ts: EpochMs
    price: Annotated[float, Meta(ge=0)] | UnsetType = UNSET
    ad_id: Id | UnsetType = UNSET
    decision_id: Id | UnsetType = UNSET


# -- ad-requests ----------------------------------------------------------------------------------
class RequestContext(_Message, kw_only=True):
    """``ad-requests.context``: what the page knows; every field may be unknown."""

    page_category: Int64Id | UnsetType = UNSET
    device: Device | UnsetType = UNSET
    country: Country | UnsetType = UNSET
    os: Annotated[str, Meta(max_length=32)] | UnsetType = UNSET


class AdRequest(_Message, kw_only=True):
    """``ad-requests``: a page asking for one ad, keyed by ``user_id``."""

    request_id: Id
    user_id: Id
    placement: Placement
    ts: EpochMs
    context: RequestContext | UnsetType = UNSET
    tmax_ms: Annotated[int, Meta(ge=1, le=60_000)] | UnsetType = UNSET
    candidates: Annotated[list[Id], Meta(min_length=1, max_length=1000)] | UnsetType = UNSET


# -- ad-decisions and ctr-feedback ----------------------------------------------------------------
class FeatureSnapshot(_Message, kw_only=True):
    """``ad-decisions.features`` and ``ctr-feedback.features``: what the model saw."""

    interest: Interest
    placement: Placement | UnsetType = UNSET
    device: Device | UnsetType = UNSET
    hour: Annotated[int, Meta(ge=0, le=23)] | UnsetType = UNSET
    category_id: Int64Id | UnsetType = UNSET
    campaign_id: Id | UnsetType = UNSET
    item_id: Int64Id | UnsetType = UNSET
    pctr: Probability | UnsetType = UNSET
    pcvr: Probability | UnsetType = UNSET
    sequence: Annotated[list[tuple[Int64Id, Int64Id]], Meta(max_length=1000)] | UnsetType = UNSET


class AdDecision(_Message, kw_only=True):
    """``ad-decisions``: the answer to one request; ``ad_id`` is None for a no fill.

    ``latency_ms`` is set last, when the decision is sent (streams/pipeline.py).
    """

    request_id: Id
    user_id: Id
    ad_id: Id | None
    score: float
    pctr: Probability
    pctr_raw: Probability | UnsetType = UNSET
    pcvr: Probability | UnsetType = UNSET
    bid: Annotated[float, Meta(ge=0)]
    propensity: Propensity
    policy: Name
    model_version: Id
    ts: EpochMs
    latency_ms: Annotated[float, Meta(ge=0)]
    no_fill_reason: Literal["no_candidates", "deadline", "shed"] | UnsetType = UNSET
    placement: Placement | UnsetType = UNSET
    campaign_id: Id | UnsetType = UNSET
    billing: Billing | UnsetType = UNSET
    arm: Name | UnsetType = UNSET
    request_ts: EpochMs | UnsetType = UNSET
    candidates: Annotated[int, Meta(ge=0)] | UnsetType = UNSET
    features: FeatureSnapshot | UnsetType = UNSET

    def click_price(self) -> float:
        """What a click on it costs: its bid if cost-per-click (a sane bid only), else 0."""
        return self.bid if self.billing == "cpc" and 0 < self.bid < math.inf else 0.0

    def conversion_price(self) -> float:
        """What its conversion costs: its bid if cost-per-conversion (a sane bid only), else 0."""
        return self.bid if self.billing == "cpa" and 0 < self.bid < math.inf else 0.0


class CtrFeedback(_Message, kw_only=True):
    """``ctr-feedback``: a served ad with its click label, keyed by ``ad_id``."""

    decision_id: Id
    ad_id: Id
    user_id: Id
    clicked: Flag
    decision_ts: EpochMs
    label_ts: EpochMs
    features: FeatureSnapshot
    propensity: Propensity
    converted: Flag | UnsetType = UNSET
    policy: Name | UnsetType = UNSET
    pctr: Probability | UnsetType = UNSET
    model_version: Id | UnsetType = UNSET
    arm: Name | UnsetType = UNSET
    click_ts: EpochMs | UnsetType = UNSET
    reason: Annotated[str, Meta(max_length=256)] | UnsetType = UNSET


# -- ad-catalog -----------------------------------------------------------------------------------
class Targeting(_Message, kw_only=True):
    """``ad-catalog.targeting``: an absent list means "no restriction" (each list's
    ``uniqueItems`` is checked by :func:`extra_check`)."""

    categories: Annotated[list[Int64Id], Meta(min_length=1)] | UnsetType = UNSET
    placements: Annotated[list[Placement], Meta(min_length=1)] | UnsetType = UNSET
    devices: Annotated[list[Device], Meta(min_length=1)] | UnsetType = UNSET
    countries: Annotated[list[Country], Meta(min_length=1)] | UnsetType = UNSET


class Ad(_Message, kw_only=True):
    """``ad-catalog``: the latest state of one ad (a null value on the topic deletes it)."""

    ad_id: Id
    campaign_id: Id
    category_id: Int64Id
    bid: Annotated[float, Meta(gt=0)]
    daily_budget: Annotated[float, Meta(ge=0)]
    targeting: Targeting
    item_id: Int64Id | UnsetType = UNSET
    embedding: Annotated[list[float], Meta(min_length=1, max_length=1024)] | UnsetType = UNSET
    text: Annotated[str, Meta(max_length=2000)] | UnsetType = UNSET
    active: bool | UnsetType = UNSET
    billing: Billing | UnsetType = UNSET

    @property
    def is_active(self) -> bool:
        """Whether to serve the ad; the schema's default for an absent ``active`` is true."""
        return self.active is not False


# -- item-catalog ---------------------------------------------------------------------------------
class Item(_Message, kw_only=True):
    """``item-catalog``: the latest metadata of one item (a null value deletes it); keyed by
    ``item_id``, user-events' integer id in canonical decimal."""

    item_id: Annotated[str, Meta(pattern=r"^(0|[1-9][0-9]{0,18})\Z")]
    title: Annotated[str, Meta(max_length=2000)]
    category_id: Int64Id
    price: Annotated[float, Meta(ge=0)] | UnsetType = UNSET


# -- dead-letters and the forget topics -----------------------------------------------------------
class DeadLetter(_Message, kw_only=True):
    """``dead-letters``: a refused message, its origin and the reason."""

    payload_b64: Base64
    key_b64: Base64 | None
    topic: Annotated[str, Meta(min_length=1, max_length=249, pattern=r"^[a-zA-Z0-9._-]+\Z")]
    partition: Count
    offset: Int64Id
    error: Label
    message: Annotated[str, Meta(min_length=1, max_length=4096)]
    ts: EpochMs
    stage: Label | UnsetType = UNSET


class ForgetRequest(_Message, kw_only=True):
    """``forget-requests``: delete one user's state (keyed by the raw user id)."""

    request_id: Id
    user_id: Id
    ts: EpochMs
    reason: Annotated[str, Meta(max_length=256)] | UnsetType = UNSET


class ForgetConfirmation(_Message, kw_only=True):
    """``forget-confirmations``: a forget request applied, its tombstones acknowledged."""

    request_id: Id
    ts: EpochMs
    partition: Count
    interest: Count
    freqcap: Count
    pending: Count


class ModelEvent(_Message, kw_only=True):
    """``model-events``: one transition of a model version through guarded promotion."""

    event: Literal["candidate", "refused", "canary", "promoted", "rolled_back"]
    version: Id
    serving: Id
    reason: Annotated[str, Meta(min_length=1, max_length=1024)]
    ts: EpochMs
    canary_labels: Count | UnsetType = UNSET
    canary_clicks: Count | UnsetType = UNSET
    control_labels: Count | UnsetType = UNSET
    control_clicks: Count | UnsetType = UNSET
    canary_calibration: Annotated[float, Meta(ge=0)] | UnsetType = UNSET
    control_calibration: Annotated[float, Meta(ge=0)] | UnsetType = UNSET


MESSAGES: dict[str, type[msgspec.Struct]] = {
    "user-events": UserEvent,
    "ad-requests": AdRequest,
    "ad-decisions": AdDecision,
    "ctr-feedback": CtrFeedback,
    "ad-catalog": Ad,
    "item-catalog": Item,
    "dead-letters": DeadLetter,
    "forget-requests": ForgetRequest,
    "forget-confirmations": ForgetConfirmation,
    "model-events": ModelEvent,
}


# -- what msgspec cannot express ------------------------------------------------------------------
def _unique(items: list[Any] | UnsetType) -> bool:
    return items is UNSET or len(set(items)) == len(items)


def _event_ok(ev: UserEvent) -> bool:
    """``dependentRequired``: ad_id and decision_id together; and a finite price."""
    if (ev.ad_id is UNSET) != (ev.decision_id is UNSET):
        return False
    return ev.price is UNSET or math.isfinite(ev.price)


def _item_ok(item: Item) -> bool:
    return item.price is UNSET or math.isfinite(item.price)


def _request_ok(req: AdRequest) -> bool:
    return _unique(req.candidates)


def _ad_ok(ad: Ad) -> bool:
    t = ad.targeting
    return all(map(_unique, (t.categories, t.placements, t.devices, t.countries)))


_CHECKS: dict[type[msgspec.Struct], Callable[[Any], bool]] = {
    UserEvent: _event_ok,
    AdRequest: _request_ok,
    Ad: _ad_ok,
    Item: _item_ok,
}


def extra_check(struct: type[msgspec.Struct]) -> Callable[[Any], bool] | None:
    """What a decoded ``struct`` must also pass to be valid by its schema, or None.

    >>> extra_check(AdRequest)(AdRequest(request_id="r", user_id="u", placement="p", ts=0,
    ...                                   candidates=["a", "a"]))
    False
    """
    return _CHECKS.get(struct)
