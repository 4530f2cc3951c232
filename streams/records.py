"""Faust Records that mirror the topic schemas field for field.

The JSON Schemas beside this module are the contract; these classes are its
Python face, and ``tests/unit/test_schemas.py`` fails when the two drift
(names, required set, types, enum values). Records do not validate: validate
the decoded dict with :func:`schemas.validator` first, then build the Record.

``from __future__ import annotations`` is safe here: Faust resolves the string
annotations against this module's globals when the class is created, so every
type named in an annotation must be imported at runtime (never under
``TYPE_CHECKING``). ``X | None`` works as well as ``Optional[X]`` in Faust
0.15.3, nested Records included (the round-trip tests cover it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import faust

EventKind = Literal["browse", "click", "cart", "fav", "purchase"]
Device = Literal["mobile", "desktop", "tablet", "tv", "other"]
Billing = Literal["cpm", "cpc"]


class _Contract(faust.Record, abstract=True, serializer="json", include_metadata=False):
    """Base that makes a Record's wire form exactly its schema's shape.

    Faust writes an unset optional field as ``null``, but the schemas say
    "optional" means "may be absent", not "may be null". So unset optionals
    are dropped, and the few fields the schema requires but allows to be null
    (``ad_id`` of a no-fill decision) are listed in ``required_nullable``:
    Faust gives every ``X | None`` field an implicit ``None`` default, so it
    cannot tell those apart by itself.
    """

    required_nullable: ClassVar[frozenset[str]] = frozenset()

    def to_representation(self) -> dict[str, Any]:
        optional = self._options.optionalset - self.required_nullable
        out: dict[str, Any] = {}
        for name, value in self.asdict().items():
            if value is None and name in optional:
                continue
            out[name] = value.to_representation() if isinstance(value, _Contract) else value
        return out


class UserEvent(_Contract):
    """``user-events``: one user action, keyed by ``user_id``."""

    event_id: str
    user_id: str
    kind: EventKind
    item_id: int
    category_id: int
    ts: int
    price: float | None = None
    ad_id: str | None = None
    decision_id: str | None = None


class RequestContext(_Contract):
    """``ad-requests.context``: what the page knows; every field may be unknown."""

    page_category: int | None = None
    device: Device | None = None
    country: str | None = None
    os: str | None = None


class AdRequest(_Contract):
    """``ad-requests``: a page asking for one ad, keyed by ``user_id``."""

    request_id: str
    user_id: str
    placement: str
    ts: int
    context: RequestContext | None = None
    tmax_ms: int | None = None
    candidates: list[str] | None = None


class FeatureSnapshot(_Contract):
    """``ctr-feedback.features`` and ``ad-decisions.features``: what the model saw."""

    interest: list[float]
    placement: str | None = None
    device: Device | None = None
    hour: int | None = None
    category_id: int | None = None
    campaign_id: str | None = None
    item_id: int | None = None
    pctr: float | None = None


class AdDecision(_Contract):
    """``ad-decisions``: the answer to one request; ``ad_id`` is None for a no fill."""

    required_nullable = frozenset({"ad_id"})

    request_id: str
    user_id: str
    ad_id: str | None
    score: float
    pctr: float
    bid: float
    propensity: float
    policy: str
    model_version: str
    ts: int
    latency_ms: float
    no_fill_reason: str | None = None
    placement: str | None = None
    campaign_id: str | None = None
    billing: Billing | None = None
    arm: str | None = None
    request_ts: int | None = None
    candidates: int | None = None
    pctr_raw: float | None = None
    features: FeatureSnapshot | None = None


class CtrFeedback(_Contract):
    """``ctr-feedback``: a served ad with its click label, keyed by ``ad_id``."""

    decision_id: str
    ad_id: str
    user_id: str
    clicked: int
    decision_ts: int
    label_ts: int
    features: FeatureSnapshot
    propensity: float
    converted: int | None = None
    policy: str | None = None
    pctr: float | None = None
    model_version: str | None = None
    arm: str | None = None
    click_ts: int | None = None
    reason: str | None = None


class Targeting(_Contract):
    """``ad-catalog.targeting``: None for a list means "no restriction"."""

    categories: list[int] | None = None
    placements: list[str] | None = None
    devices: list[Device] | None = None
    countries: list[str] | None = None


class Ad(_Contract):
    """``ad-catalog``: the latest state of one ad (a null value on the topic deletes it)."""

    ad_id: str
    campaign_id: str
    category_id: int
    bid: float
    daily_budget: float
    targeting: Targeting
    item_id: int | None = None
    embedding: list[float] | None = None
    text: str | None = None
    active: bool | None = None
    billing: Billing | None = None

    @property
    def is_active(self) -> bool:
        """Whether to serve the ad; the schema's default for an absent ``active`` is true."""
        return self.active is not False


class DeadLetter(_Contract):
    """``dead-letters``: a refused message, its origin and the reason."""

    required_nullable = frozenset({"key_b64"})

    payload_b64: str
    key_b64: str | None
    topic: str
    partition: int
    offset: int
    error: str
    message: str
    ts: int
    stage: str | None = None


class ForgetRequest(_Contract):
    """``forget-requests``: delete one user's state (keyed by the raw user id)."""

    request_id: str
    user_id: str
    ts: int
    reason: str | None = None


class ForgetConfirmation(_Contract):
    """``forget-confirmations``: a forget request applied, its tombstones acknowledged."""

    request_id: str
    ts: int
    partition: int
    interest: int
    freqcap: int
    pending: int
